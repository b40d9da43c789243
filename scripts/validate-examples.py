#!/usr/bin/env python3
"""Validates every examples/*.yaml against schemas/pipeline.schema.json (jsonschema + PyYAML)."""
import json
import pathlib
import sys

import jsonschema
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
schema = json.loads((root / "schemas" / "pipeline.schema.json").read_text())
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
paths = sys.argv[1:] or sorted(str(p) for p in (root / "examples").glob("*.yaml"))
failed = False
for path in paths:
    document = yaml.safe_load(pathlib.Path(path).read_text())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    for error in errors:
        failed = True
        print(f"{path}: {'/'.join(map(str, error.path)) or '(root)'}: {error.message}")
    if not errors:
        print(f"{path}: valid")
sys.exit(1 if failed else 0)
