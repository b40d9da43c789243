"""Starts the service against the Redis the pipeline runs beside this step, and counts."""

import os
import subprocess
import sys
import unittest
import urllib.request

APP = os.path.join(os.path.dirname(__file__), "..", "..", "app")


class ServiceTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = subprocess.Popen(
            [sys.executable, os.path.join(APP, "counter_service.py"), "8000"], stdout=subprocess.PIPE, text=True
        )
        line = cls.server.stdout.readline()
        assert "counting visits" in line, line

    @classmethod
    def tearDownClass(cls):
        cls.server.kill()
        cls.server.wait()

    def get(self, path):
        with urllib.request.urlopen("http://127.0.0.1:8000" + path, timeout=5) as reply:
            return reply.read().decode()

    def test_counts_in_redis(self):
        first = self.get("/docs/")
        second = self.get("/docs")
        self.assertEqual(first, "/docs has been visited 1 time\n")
        self.assertEqual(second, "/docs has been visited 2 times\n")

    def test_cli_shares_the_count(self):
        self.get("/shared")
        out = subprocess.run(
            [sys.executable, os.path.join(APP, "counter_cli.py"), "/shared"], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out, "/shared has been visited 2 times\n")


if __name__ == "__main__":
    unittest.main()
