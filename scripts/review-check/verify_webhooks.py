"""Verifies webhook deliveries with the Standard Webhooks reference library (PyPI standardwebhooks).

  verify_webhooks.py SECRET FILE

FILE is a JSON array of {"headers": {...}, "body": "..."}. Prints one line per
delivery, "ok TYPE" or "refused: REASON", then "verified=N refused=M".
"""
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main(secret, path):
    hook = Webhook(secret)
    verified = refused = 0
    with open(path) as f:
        deliveries = json.load(f)
    for d in deliveries:
        try:
            payload = hook.verify(d["body"], d["headers"])
            verified += 1
            print("ok", payload.get("type", "?"))
        except WebhookVerificationError as e:
            refused += 1
            print("refused:", e)
    print(f"verified={verified} refused={refused}")


if __name__ == "__main__":
    main(*sys.argv[1:])
