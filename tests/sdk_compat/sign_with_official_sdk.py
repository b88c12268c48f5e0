#!/usr/bin/env python3
"""Checks that keyturn's simulator accepts requests signed by Huawei Cloud's official Python SDK.

How to run (needs python3 and `pip install huaweicloudsdkcore huaweicloudsdkgaussdb`):
  * from Rust, which starts a simulator and runs this script against it:
      cargo test official_python_sdk -- --ignored --nocapture
  * by hand, against a simulator already listening (e.g. `keyturn simulator`):
      SIM_ENDPOINT=http://127.0.0.1:PORT SIM_AK=... SIM_SK=... SIM_PROJECT_ID=... \
      SIM_INSTANCE_ID=...in07 SIM_KMS_KEY_ID=<uuid> python3 sign_with_official_sdk.py
    The instance must start "off"; the script leaves it "off".

It checks three things: the official GaussDB client (ModifyBackupEncryptStatus and
DescribeBackupEncryptStatus, signed by the SDK's BasicCredentials) works end to end; a request
signed by the SDK core's `Signer` and sent with `requests` verifies; and the simulator rejects the
same signer with a wrong SK (401 APIGW.0301) and with a stale X-Sdk-Date (401 APIGW.0303), so the
accepted cases prove something. Exits non-zero on the first failed check.
"""

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from urllib.parse import urlparse

import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ServiceResponseException
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from huaweicloudsdkgaussdb.v3 import (
    BackupEncryptRequest,
    DescribeBackupEncryptStatusRequest,
    GaussDBClient,
    ModifyBackupEncryptStatusRequest,
)

ENDPOINT = os.environ["SIM_ENDPOINT"].rstrip("/")
AK = os.environ["SIM_AK"]
SK = os.environ["SIM_SK"]
PROJECT = os.environ["SIM_PROJECT_ID"]
INSTANCE = os.environ["SIM_INSTANCE_ID"]
KMS_KEY = os.environ["SIM_KMS_KEY_ID"]
PATH = f"/v3/{PROJECT}/instances/{INSTANCE}/backups/encryption"


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what)
    if not condition:
        sys.exit(1)


def official_client():
    """The SDK's own GaussDB client, pointed at the simulator."""
    return (
        GaussDBClient.new_builder()
        .with_credentials(BasicCredentials(AK, SK, PROJECT))
        .with_endpoint(ENDPOINT)
        .build()
    )


def client_round_trip():
    client = official_client()
    body = BackupEncryptRequest(encryption_status="on", type="kms", kms_key_id=KMS_KEY)
    on = client.modify_backup_encrypt_status(ModifyBackupEncryptStatusRequest(instance_id=INSTANCE, body=body))
    check(on.encryption_status == "on", f"GaussDBClient ModifyBackupEncryptStatus on -> {on.encryption_status}")
    seen = client.describe_backup_encrypt_status(DescribeBackupEncryptStatusRequest(instance_id=INSTANCE))
    check(seen.encryption_status == "on", f"GaussDBClient DescribeBackupEncryptStatus -> {seen.encryption_status}")
    off_body = BackupEncryptRequest(encryption_status="off")
    off = client.modify_backup_encrypt_status(ModifyBackupEncryptStatusRequest(instance_id=INSTANCE, body=off_body))
    check(off.encryption_status == "off", f"GaussDBClient ModifyBackupEncryptStatus off -> {off.encryption_status}")
    try:
        bad = BackupEncryptRequest(encryption_status="on", type="kms", kms_key_id="not-a-uuid")
        client.modify_backup_encrypt_status(ModifyBackupEncryptStatusRequest(instance_id=INSTANCE, body=bad))
        check(False, "GaussDBClient with a bad kms_key_id should fail")
    except ServiceResponseException as error:
        check(error.status_code == 400 and error.error_code == "DBS.200001",
              f"GaussDBClient bad kms_key_id -> {error.status_code} {error.error_code}, request id {error.request_id}")


def core_signed(sk, sdk_date=None, query=None):
    """A Modify signed by the SDK core's Signer exactly as the SDK would, sent with requests."""
    body = json.dumps({"encryption_status": "off"}).encode()
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Project-Id": PROJECT}
    if sdk_date is not None:
        headers["X-Sdk-Date"] = sdk_date
    request = SdkRequest(
        method="POST",
        schema=urlparse(ENDPOINT).scheme,
        host=urlparse(ENDPOINT).netloc,
        resource_path=PATH,
        query_params=query or [],
        header_params=headers,
        body=body,
    )
    signed = Signer(BasicCredentials(AK, sk, PROJECT)).sign(request)
    print("     signed:", signed.header_params["Authorization"].split(", Signature=")[0])
    return requests.post(f"{ENDPOINT}{signed.uri}", headers=signed.header_params, data=signed.body, timeout=10)


def core_signer_checks():
    accepted = core_signed(SK, query=[("note", "a b+c"), ("lang", "en-us")])
    check(accepted.status_code == 200, f"core Signer with query -> {accepted.status_code} {accepted.text}")
    check(bool(accepted.headers.get("X-Request-Id")), "X-Request-Id present")
    wrong = core_signed("not-the-secret")
    code = wrong.json().get("error_code")
    check(wrong.status_code == 401 and code == "APIGW.0301", f"wrong SK -> {wrong.status_code} {code}")
    print("     gateway said:", wrong.json().get("error_msg"))
    stale = (datetime.now(timezone.utc) - timedelta(minutes=20)).strftime("%Y%m%dT%H%M%SZ")
    expired = core_signed(SK, sdk_date=stale)
    code = expired.json().get("error_code")
    check(expired.status_code == 401 and code == "APIGW.0303", f"stale X-Sdk-Date -> {expired.status_code} {code}")


if __name__ == "__main__":
    client_round_trip()
    core_signer_checks()
    print("official SDK compatibility: all checks passed")
