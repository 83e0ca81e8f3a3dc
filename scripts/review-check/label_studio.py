"""Checks Sluice's Label Studio files with Label Studio's own library (label-studio-sdk).

  label_studio.py validate CONFIG TASKS   parse the labeling config with
      LabelInterface, check that every task has the data fields the config's
      objects read, and validate every prediction; prints one line per
      invalid prediction and a summary, exits 1 if anything is invalid.
  label_studio.py csv CONFIG EXPORT OUT   turn a Label Studio JSON export into
      Label Studio's CSV export with the SDK's converter (the code Label
      Studio's own CSV export runs).
"""
import json
import sys

from label_studio_sdk.label_interface import LabelInterface


def validate(config_path, tasks_path):
    with open(config_path) as f:
        config = f.read()
    interface = LabelInterface(config)
    interface.validate()
    with open(tasks_path) as f:
        tasks = json.load(f)
    predictions = invalid = 0
    for n, task in enumerate(tasks):
        for obj in interface.objects:
            if obj.value_is_variable and task["data"].get(obj.value_name) is None:
                invalid += 1
                print(f"task {n}: data has no {obj.value_name!r} for object {obj.name!r}")
        for p in task.get("predictions", []):
            predictions += 1
            errors = interface.validate_prediction(p, return_errors=True)
            if errors:
                invalid += 1
                print(f"task {n} ({task['data'].get('sluice_id')}): " + "; ".join(errors))
    print(f"tasks={len(tasks)} predictions={predictions} invalid={invalid}")
    return 1 if invalid else 0


def to_csv(config_path, export_path, out_path):
    from label_studio_sdk.converter import Converter

    converter = Converter(config=config_path, project_dir=None, download_resources=False)
    converter.convert_to_csv(export_path, out_path, is_dir=False, sep=",")
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit({"validate": validate, "csv": to_csv}[command](*args))
