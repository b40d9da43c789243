import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "app"))

from counter import normalize, render  # noqa: E402


class CounterTest(unittest.TestCase):
    def test_normalize(self):
        self.assertEqual(normalize("/"), "/")
        self.assertEqual(normalize("/a//b/"), "/a/b")
        self.assertEqual(normalize("/a/./b?x=1"), "/a/b")

    def test_render(self):
        self.assertEqual(render("/", 1), "/ has been visited 1 time\n")
        self.assertEqual(render("/a", 2), "/a has been visited 2 times\n")


if __name__ == "__main__":
    unittest.main()
