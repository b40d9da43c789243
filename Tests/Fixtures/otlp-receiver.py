"""An OTLP/HTTP trace receiver for tests: decodes each POST /v1/traces with the OpenTelemetry
protobuf definitions (opentelemetry-proto) and writes it as JSON (field names as in the proto).

Usage: otlp-receiver.py OUT_DIR    (prints the port it listens on, on 127.0.0.1, then serves)
Each request becomes OUT_DIR/request-N.json; a body the definitions cannot decode is answered
400 and written as OUT_DIR/error-N.txt.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OUT = Path(sys.argv[1])
COUNT = 0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the stdlib's name)
        global COUNT
        COUNT += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            (OUT / f"error-{COUNT}.txt").write_text(f"path {self.path}, type {self.headers.get('Content-Type')}")
            self.send_response(404)
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as exc:  # a body the definitions reject
            (OUT / f"error-{COUNT}.txt").write_text(repr(exc))
            self.send_response(400)
            self.end_headers()
            return
        decoded = MessageToDict(request, preserving_proto_field_name=True)
        decoded["headers"] = {k.lower(): v for k, v in self.headers.items()}
        (OUT / f"request-{COUNT}.json").write_text(json.dumps(decoded, indent=1))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
