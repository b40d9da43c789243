"""Judges pipeline files against schemas/pipeline.schema.json: prints "valid" or "invalid" and
the first reason for each file, one line each. Debian's python3-jsonschema and python3-yaml
(installed by scripts/setup) read them as editors and CI linters do."""
import json
import sys

import jsonschema
import yaml

schema = json.load(open(sys.argv[1]))
validator = jsonschema.Draft202012Validator(schema)
for path in sys.argv[2:]:
    with open(path) as f:
        document = yaml.safe_load(f)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    reason = errors[0].message.replace("\n", " ")[:120] if errors else ""
    print(f"{path}\t{'invalid' if errors else 'valid'}\t{reason}")
