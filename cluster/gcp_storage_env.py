"""Print the environment that points raylm's S3 client at Cloud Storage, for `eval` before `ray start` on GCP.

    eval "$(python cluster/gcp_storage_env.py PROJECT)"

The HMAC key comes from Secret Manager (secrets raylm-hmac-id and raylm-hmac-secret), fetched with the node's own
service account through the metadata server, so no key is written into the cluster YAML. Standard library only: it
runs inside the Ray image before anything else is installed.
"""

import base64
import json
import shlex
import sys
import urllib.request

METADATA_TOKEN = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
SECRET = "https://secretmanager.googleapis.com/v1/projects/{project}/secrets/{name}/versions/latest:access"


def get_json(url: str, headers: dict) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return json.load(response)


def read_secret(project: str, name: str, token: str) -> str:
    payload = get_json(SECRET.format(project=project, name=name), {"Authorization": f"Bearer {token}"})["payload"]
    return base64.b64decode(payload["data"]).decode().strip()


def main(project: str) -> None:
    token = get_json(METADATA_TOKEN, {"Metadata-Flavor": "Google"})["access_token"]
    env = {
        "AWS_ENDPOINT_URL": "https://storage.googleapis.com",
        "AWS_DEFAULT_REGION": "auto",
        "AWS_ACCESS_KEY_ID": read_secret(project, "raylm-hmac-id", token),
        "AWS_SECRET_ACCESS_KEY": read_secret(project, "raylm-hmac-secret", token),
    }
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python cluster/gcp_storage_env.py PROJECT")
    main(sys.argv[1])
