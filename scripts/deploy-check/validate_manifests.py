"""Validates rendered Kubernetes manifests: every core object against the
Kubernetes JSON schemas of kubernetes-validate (strict: unknown fields are
errors), and hands custom resources (KEDA's) to validate_crds.mjs.

usage: validate_manifests.py KUBERNETES_VERSION RENDERED.yaml...
Prints one line per object; exits 1 if any is invalid."""

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent


def main() -> int:
    version, files = sys.argv[1], sys.argv[2:]
    failed, custom = 0, []
    for f in files:
        for doc in yaml.safe_load_all(Path(f).read_text()):
            if not doc:
                continue
            name = f"{f}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["apiVersion"].startswith("keda.sh/"):
                custom.append({"file": f, "object": doc})
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                print(f"ok      {name}")
            except kubernetes_validate.ValidationError as e:
                print(f"INVALID {name}: {e.message} at {'/'.join(map(str, e.path))}")
                failed += 1
            except kubernetes_validate.SchemaNotFoundError as e:
                print(f"INVALID {name}: {e.message}")
                failed += 1
    if custom:
        # KEDA's schemas as the @kubernetes-models/keda package carries them.
        r = subprocess.run(["node", str(HERE / "validate_crds.mjs")], input=json.dumps(custom), text=True)
        failed += r.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
