"""The EC2 instance lifecycle through boto3, against a Karri gateway.

Run by `e2e/tests/ec2_compat.rs` with the environment of `Gateway::aws_env` (endpoint, keys,
region, CA bundle, isolated AWS configuration) and two arguments: the operator's retention in
seconds (how long terminated instances stay visible) and an image location to register.

Prints one `ok <n>: <what>` line per checked step and `passed: <n> steps` at the end; on the
first failed check it prints `FAIL: <what>` (with the API error, if any) and exits with status 1.
Polling (waiters, and waiting for collection) always has a deadline.
"""

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, WaiterError

USER_DATA = "#!/bin/sh\necho 'hello from boto3' > /tmp/hello\n"
TAGS = [{"Key": "Name", "Value": "boto-web"}, {"Key": "team", "Value": "b"}]
# Poll every second; 60 attempts is far more than a launch on libvirt's test driver needs.
WAIT = {"Delay": 1, "MaxAttempts": 60}


class Failure(Exception):
    """A check that did not hold."""


STEPS = 0


def ok(what):
    global STEPS
    STEPS += 1
    print(f"ok {STEPS}: {what}", flush=True)


def check(condition, message):
    if not condition:
        raise Failure(message)


def expect_error(code, call, **params):
    """Calls `call(**params)` and checks that it fails with the EC2 error `code`."""
    try:
        answer = call(**params)
    except ClientError as e:
        got = e.response.get("Error", {}).get("Code")
        check(got == code, f"{call.__name__} failed with {got!r} ({e}), expected {code!r}")
        return e
    raise Failure(f"{call.__name__} succeeded ({answer}), expected the error {code!r}")


def poll(what, timeout, probe):
    """Calls `probe()` until it returns something other than None, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value, last = probe()
        except ClientError as e:
            value, last = None, f"error: {e}"
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise Failure(f"timed out after {timeout} s waiting until {what}; last seen: {last}")
        time.sleep(0.2)


def instances_of(answer):
    return [i for r in answer["Reservations"] for i in r["Instances"]]


def all_instances(ec2, **params):
    return instances_of(ec2.describe_instances(**params))


def wait(ec2, waiter, ids):
    try:
        ec2.get_waiter(waiter).wait(InstanceIds=ids, WaiterConfig=WAIT)
    except WaiterError as e:
        raise Failure(f"waiter {waiter} for {ids} failed: {e} (last answer: {e.last_response})")


def states(ec2, ids):
    return {i["InstanceId"]: i["State"]["Name"] for i in all_instances(ec2, InstanceIds=ids)}


def check_endpoint(ec2):
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    check(endpoint.startswith("https://127.0.0.1:"), f"AWS_ENDPOINT_URL is {endpoint!r}")
    check(
        ec2.meta.endpoint_url.rstrip("/") == endpoint.rstrip("/"),
        f"boto3 talks to {ec2.meta.endpoint_url}, not to the gateway at {endpoint}",
    )
    check(ec2.meta.region_name == "karri-1", f"region is {ec2.meta.region_name}")
    ok(f"boto3 client for region karri-1 at {endpoint}")


def key_pair(ec2):
    made = ec2.create_key_pair(KeyName="boto-key")
    material = made.get("KeyMaterial", "")
    check(material.startswith("-----BEGIN"), f"key material starts with {material[:30]!r}")
    check(made["KeyName"] == "boto-key", f"created key name {made['KeyName']}")
    check(made["KeyPairId"].startswith("key-"), f"key pair ID {made['KeyPairId']}")
    check(made["KeyFingerprint"], "the created key pair has no fingerprint")
    ok(f"create_key_pair returned PEM key material, {made['KeyPairId']}")

    shown = ec2.describe_key_pairs(KeyNames=["boto-key"], IncludePublicKey=True)["KeyPairs"]
    check(len(shown) == 1, f"describe_key_pairs(boto-key) shows {len(shown)} key pairs")
    check(
        shown[0]["KeyPairId"] == made["KeyPairId"]
        and shown[0]["KeyFingerprint"] == made["KeyFingerprint"],
        f"described {shown[0]} differs from created {made['KeyPairId']} {made['KeyFingerprint']}",
    )
    # The private key handed out belongs to the public key stored: OpenSSH derives the same one.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "boto-key.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(material)
        derived = subprocess.run(
            ["ssh-keygen", "-y", "-f", path], capture_output=True, text=True, check=False
        )
    check(derived.returncode == 0, f"ssh-keygen -y cannot read the private key: {derived.stderr}")
    stored = shown[0].get("PublicKey", "").split()[:2]
    check(
        derived.stdout.split()[:2] == stored,
        f"public key of the private key {derived.stdout.split()[:2]} != stored {stored}",
    )
    # EC2's fingerprint of an RSA key it created: SHA-1 of the DER PKCS#8 private key, as
    # `openssl pkcs8 -topk8 -nocrypt -outform DER | openssl sha1 -c` prints it.
    der = subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-nocrypt", "-inform", "PEM", "-outform", "DER"],
        input=material.encode(), capture_output=True, check=False,
    )
    check(der.returncode == 0, f"openssl cannot read the private key: {der.stderr!r}")
    expected = ":".join(f"{b:02x}" for b in hashlib.sha1(der.stdout).digest())
    check(
        made["KeyFingerprint"] == expected,
        f"fingerprint {made['KeyFingerprint']}, but SHA-1 of the PKCS#8 key is {expected}",
    )
    ok("describe_key_pairs shows the key; its public key and its fingerprint match the PEM")

    expect_error("InvalidKeyPair.Duplicate", ec2.create_key_pair, KeyName="boto-key")
    ok("a second create_key_pair of the same name is refused (InvalidKeyPair.Duplicate)")
    return made


def image(ec2, location):
    image_id = ec2.register_image(Name="boto-image", ImageLocation=location)["ImageId"]
    check(image_id.startswith(("emi-", "ami-")), f"registered image ID {image_id}")
    mine = ec2.describe_images(Owners=["self"])["Images"]
    found = [i for i in mine if i["ImageId"] == image_id]
    check(len(found) == 1, f"describe_images(Owners=[self]) shows {[i['ImageId'] for i in mine]}")
    check(
        found[0]["ImageLocation"] == location and found[0]["Name"] == "boto-image",
        f"image shown as {found[0]}",
    )
    ok(f"register_image {image_id}; describe_images(Owners=['self']) finds it")

    perms = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    check(perms["ImageId"] == image_id, f"launchPermission answer for {perms['ImageId']}")
    check(perms["LaunchPermissions"] == [], f"a new image is shared: {perms['LaunchPermissions']}")
    ec2.modify_image_attribute(
        ImageId=image_id, LaunchPermission={"Add": [{"UserId": "123456789012"}]}
    )
    perms = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    check(
        perms["LaunchPermissions"] == [{"UserId": "123456789012"}],
        f"after sharing, launch permissions are {perms['LaunchPermissions']}",
    )
    ok("describe_image_attribute(launchPermission): none at first, the account once shared")
    # Attributes EC2 knows but this image has no value for are answered, not refused.
    for attribute in ("tpmSupport", "imdsSupport", "lastLaunchedTime", "deregistrationProtection"):
        answer = ec2.describe_image_attribute(ImageId=image_id, Attribute=attribute)
        check(answer["ImageId"] == image_id, f"{attribute}: {answer}")
    ok("describe_image_attribute answers tpmSupport, imdsSupport, lastLaunchedTime and "
       "deregistrationProtection")
    return image_id


def launch(ec2, image_id):
    params = dict(
        ImageId=image_id,
        MinCount=3,
        MaxCount=3,
        InstanceType="t1.micro",
        KeyName="boto-key",
        UserData=USER_DATA,
        TagSpecifications=[{"ResourceType": "instance", "Tags": TAGS}],
    )
    expect_error("DryRunOperation", ec2.run_instances, DryRun=True, **params)
    # The network interface specification Ansible's ec2_instance always sends.
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    interface = {"DeviceIndex": 0, "SubnetId": subnet, "DeleteOnTermination": True,
                 "AssociatePublicIpAddress": False}
    expect_error("DryRunOperation", ec2.run_instances, DryRun=True,
                 NetworkInterfaces=[interface], **params)
    # And the volume tags it sends with every named launch (there are no volumes to tag).
    with_volume_tags = dict(params, TagSpecifications=params["TagSpecifications"] + [
        {"ResourceType": "volume", "Tags": TAGS}])
    expect_error("DryRunOperation", ec2.run_instances, DryRun=True, **with_volume_tags)
    expect_error("UnsupportedOperation", ec2.run_instances, DryRun=True,
                 **dict(params, TagSpecifications=[{"ResourceType": "network-interface",
                                                    "Tags": TAGS}]))
    check(all_instances(ec2) == [], "the dry run launched instances")
    ok("run_instances(DryRun=True) answers DryRunOperation and launches nothing")

    token = "boto-lifecycle-1"
    first = ec2.run_instances(ClientToken=token, **params)
    ids = sorted(i["InstanceId"] for i in first["Instances"])
    check(len(set(ids)) == 3, f"run_instances(count 3) launched {ids}")
    check(
        all(i["ImageId"] == image_id and i["KeyName"] == "boto-key" for i in first["Instances"]),
        f"launched instances {first['Instances']}",
    )
    launched = [
        (i["Placement"]["AvailabilityZone"], i["MetadataOptions"]["State"])
        for i in first["Instances"]
    ]
    check(
        all(zone and state == "pending" for zone, state in launched),
        f"launched instances show (zone, metadata options state) {launched}",
    )
    ok("run_instances answers each instance's zone, its metadata options pending")
    for attempt in (1, 2):
        again = ec2.run_instances(ClientToken=token, **params)
        check(
            again["ReservationId"] == first["ReservationId"],
            f"retry {attempt} with the client token made {again['ReservationId']}, "
            f"not {first['ReservationId']}",
        )
        again_ids = sorted(i["InstanceId"] for i in again["Instances"])
        check(again_ids == ids, f"retry {attempt} answered {again_ids}, not {ids}")
    everything = sorted(i["InstanceId"] for i in all_instances(ec2))
    check(everything == ids, f"after two retries the account has {everything}, not {ids}")
    ok(f"run_instances with ClientToken, retried twice: one reservation {first['ReservationId']}")

    other = dict(params, InstanceType="m1.small")
    expect_error("IdempotentParameterMismatch", ec2.run_instances, ClientToken=token, **other)
    ok("the same ClientToken with another instance type: IdempotentParameterMismatch")

    wait(ec2, "instance_running", ids)
    now = states(ec2, ids)
    check(set(now.values()) == {"running"}, f"after the instance_running waiter: {now}")
    ok(f"waiter instance_running: {ids} running")

    # Each running instance shows its one network interface, as SDK tools read it (Terraform's
    # primary_network_interface_id, Ansible's network facts).
    for i in all_instances(ec2, InstanceIds=ids):
        nics = i.get("NetworkInterfaces", [])
        check(len(nics) == 1, f"{i['InstanceId']} shows interfaces {nics}")
        nic = nics[0]
        check(
            nic["NetworkInterfaceId"] == "eni-" + i["InstanceId"][2:]
            and nic["SubnetId"] == i["SubnetId"] and nic["VpcId"] == i["VpcId"]
            and nic["PrivateIpAddress"] == i["PrivateIpAddress"]
            and len(nic["MacAddress"].split(":")) == 6
            and nic["Attachment"]["DeviceIndex"] == 0
            and nic["Attachment"]["DeleteOnTermination"] is True
            and nic["PrivateIpAddresses"][0]["Primary"] is True,
            f"{i['InstanceId']}'s interface {nic}",
        )
    ok("each running instance shows its primary network interface")

    # The interface's own filters, and EC2's platform filters (Karri runs Linux on demand).
    described = all_instances(ec2, InstanceIds=ids)
    first = next(i for i in described if i["InstanceId"] == ids[0])
    nic = first["NetworkInterfaces"][0]
    same_subnet = [i["InstanceId"] for i in described if i["NetworkInterfaces"][0]["SubnetId"] == nic["SubnetId"]]
    for name, value, want in [
        ("network-interface.subnet-id", nic["SubnetId"], same_subnet),
        ("network-interface.mac-address", nic["MacAddress"], ids[:1]),
        ("network-interface.network-interface-id", nic["NetworkInterfaceId"], ids[:1]),
        ("network-interface.attachment.status", "attached", ids),
        ("platform-details", "Linux/UNIX", ids),
        ("platform", "windows", []),
        ("instance-lifecycle", "spot", []),
        ("network-interface.association.public-ip", "203.0.113.5", []),
    ]:
        found = all_instances(
            ec2,
            Filters=[
                {"Name": name, "Values": [value]},
                {"Name": "instance-id", "Values": ids},
            ],
        )
        got = sorted(i["InstanceId"] for i in found)
        check(got == sorted(want), f"filter {name}={value} finds {got}, expected {sorted(want)}")
    check(
        first.get("PlatformDetails") == "Linux/UNIX" and first.get("UsageOperation") == "RunInstances",
        f"{first['InstanceId']} shows platform details {first.get('PlatformDetails')!r}",
    )
    ok("network-interface.*, platform, platform-details and instance-lifecycle filters match as shown")

    subnet = ec2.describe_subnets(SubnetIds=[nic["SubnetId"]])["Subnets"][0]
    prefix = int(subnet["CidrBlock"].split("/")[1])
    holding = [
        i["InstanceId"]
        for i in all_instances(ec2)
        if i["State"]["Name"] != "terminated"
        and i.get("SubnetId") == nic["SubnetId"]
        and i.get("PrivateIpAddress")
    ]
    free = 2 ** (32 - prefix) - 5 - len(holding)
    check(
        subnet["AvailableIpAddressCount"] == free and len(holding) >= 1,
        f"subnet {subnet['CidrBlock']} shows {subnet['AvailableIpAddressCount']} free addresses "
        f"with {len(holding)} held, expected {free}",
    )
    ok("a subnet's free addresses are its own but five, less those its instances hold")

    running = all_instances(
        ec2,
        Filters=[
            {"Name": "tag:Name", "Values": ["boto-web"]},
            {"Name": "instance-state-name", "Values": ["running"]},
        ],
    )
    check(
        sorted(i["InstanceId"] for i in running) == ids,
        f"filter tag:Name=boto-web, running finds {[i['InstanceId'] for i in running]}",
    )
    tags = {t["Key"]: t["Value"] for t in running[0].get("Tags", [])}
    check(tags == {t["Key"]: t["Value"] for t in TAGS}, f"tags of {running[0]['InstanceId']}: {tags}")
    ok("describe_instances with tag and state filters finds exactly the 3, tagged")

    # EC2 takes any character in a tag: a multi-line description comes back as it was.
    multi_line = "line one\nline two\r\n\tindented <&>"
    ec2.create_tags(Resources=ids[:1], Tags=[{"Key": "Description", "Value": multi_line}])
    shown = {
        t["Key"]: t["Value"] for t in all_instances(ec2, InstanceIds=ids[:1])[0].get("Tags", [])
    }
    check(shown.get("Description") == multi_line, f"multi-line tag came back as {shown.get('Description')!r}")
    ec2.delete_tags(Resources=ids[:1], Tags=[{"Key": "Description"}])
    ok("a tag value with tabs and line ends round-trips")
    applied = {i["MetadataOptions"]["State"] for i in running}
    check(applied == {"applied"}, f"running instances' metadata options: {applied}")
    ok("running instances' metadata options are applied")

    user_data = ec2.describe_instance_attribute(InstanceId=ids[0], Attribute="userData")
    expected = base64.b64encode(USER_DATA.encode()).decode()
    got = user_data.get("UserData", {}).get("Value")
    check(got == expected, f"userData of {ids[0]} is {got!r}, expected {expected!r}")
    ok("describe_instance_attribute(userData) is the base64 of the user data")

    # Setting an attribute Karri does not let change to the value it has is a no-op, as on EC2;
    # another value is refused.
    ec2.modify_instance_attribute(InstanceId=ids[0], SourceDestCheck={"Value": True})
    ec2.modify_instance_attribute(InstanceId=ids[0], DisableApiStop={"Value": False})
    ec2.modify_instance_attribute(
        InstanceId=ids[0], InstanceInitiatedShutdownBehavior={"Value": "stop"}
    )
    expect_error(
        "UnsupportedOperation",
        ec2.modify_instance_attribute,
        InstanceId=ids[0],
        SourceDestCheck={"Value": False},
    )
    ok("modify_instance_attribute to the value an attribute has succeeds; to another is refused")
    return ids


def pagination(ec2, image_id, first_ids):
    more = ec2.run_instances(ImageId=image_id, MinCount=4, MaxCount=4, InstanceType="t1.micro")
    more_ids = sorted(i["InstanceId"] for i in more["Instances"])
    check(len(set(more_ids)) == 4, f"run_instances(count 4) launched {more_ids}")
    everything = sorted(first_ids + more_ids)

    pages = list(
        ec2.get_paginator("describe_instances").paginate(PaginationConfig={"PageSize": 5})
    )
    sizes = [len(instances_of(p)) for p in pages]
    seen = sorted(i["InstanceId"] for p in pages for i in instances_of(p))
    check(sizes == [5, 2], f"paginator with PageSize 5 over 7 instances gave pages of {sizes}")
    check(seen == everything, f"paginator saw {seen}, expected each of {everything} once")
    ok(f"get_paginator('describe_instances') PageSize 5: pages {sizes}, each instance once")

    seen, token, calls = [], None, 0
    while True:
        params = {"MaxResults": 5}
        if token:
            params["NextToken"] = token
        page = ec2.describe_instances(**params)
        calls += 1
        seen += [i["InstanceId"] for i in instances_of(page)]
        token = page.get("NextToken")
        check(calls == 1 or token is None, f"page {calls} has a next token again: {token}")
        if calls == 1:
            check(token, "the first page of 5 out of 7 has no NextToken")
        if not token:
            break
    check(sorted(seen) == everything, f"MaxResults/NextToken saw {seen}, expected {everything}")
    ok(f"MaxResults 5 / NextToken: {calls} pages, each of the 7 instances once")
    return more_ids


def stop_modify_start(ec2, ids):
    target, other = ids[0], ids[1]
    expect_error(
        "IncorrectInstanceState",
        ec2.modify_instance_attribute,
        InstanceId=target,
        InstanceType={"Value": "m1.small"},
    )
    ok("modify_instance_attribute(InstanceType) of a running instance: IncorrectInstanceState")

    stopping = ec2.stop_instances(InstanceIds=[target])["StoppingInstances"]
    check(
        [(s["InstanceId"], s["PreviousState"]["Name"]) for s in stopping] == [(target, "running")]
        and stopping[0]["CurrentState"]["Name"] in ("stopping", "stopped"),
        f"stop_instances answered {stopping}",
    )
    wait(ec2, "instance_stopped", [target])
    now = states(ec2, [target, other])
    check(now == {target: "stopped", other: "running"}, f"after stopping {target}: {now}")
    ok(f"stop_instances + waiter instance_stopped: {target} stopped, {other} still running")

    ec2.modify_instance_attribute(InstanceId=target, InstanceType={"Value": "m1.small"})
    shown = ec2.describe_instance_attribute(InstanceId=target, Attribute="instanceType")
    check(shown["InstanceType"]["Value"] == "m1.small", f"instance type now {shown}")
    ok("modify_instance_attribute(InstanceType=m1.small) while stopped")

    starting = ec2.start_instances(InstanceIds=[target])["StartingInstances"]
    check(
        [(s["InstanceId"], s["PreviousState"]["Name"]) for s in starting] == [(target, "stopped")],
        f"start_instances answered {starting}",
    )
    wait(ec2, "instance_running", [target])
    instance = all_instances(ec2, InstanceIds=[target])[0]
    check(
        instance["State"]["Name"] == "running" and instance["InstanceType"] == "m1.small",
        f"after starting: {instance['State']} {instance['InstanceType']}",
    )
    ok(f"start_instances + waiter instance_running: {target} running as m1.small")

    # IMDSv2 enforced on a running instance, as hardening scripts do; the rest kept.
    answer = ec2.modify_instance_metadata_options(InstanceId=target, HttpTokens="required",
                                                  HttpPutResponseHopLimit=2)
    options = answer["InstanceMetadataOptions"]
    check(answer["InstanceId"] == target and options["HttpTokens"] == "required"
          and options["HttpPutResponseHopLimit"] == 2 and options["HttpEndpoint"] == "enabled",
          f"modify_instance_metadata_options answered {answer}")
    shown = all_instances(ec2, InstanceIds=[target])[0]["MetadataOptions"]
    check(shown["HttpTokens"] == "required" and shown["HttpPutResponseHopLimit"] == 2,
          f"after the change the instance shows {shown}")
    expect_error("InvalidParameterCombination", ec2.modify_instance_metadata_options,
                 InstanceId=target)
    ok("modify_instance_metadata_options(HttpTokens=required) of a running instance")

    ec2.reboot_instances(InstanceIds=[target])
    expect_error(
        "InvalidInstanceID.NotFound", ec2.reboot_instances, InstanceIds=["i-0000000000000dead"]
    )
    ok("reboot_instances accepted for a running instance, refused for an unknown one")
    # The test hypervisor has no serial console: the answer names the instance, with no output.
    console = ec2.get_console_output(InstanceId=target)
    check(
        console["InstanceId"] == target and "Timestamp" in console and "Output" not in console,
        f"console output of {target}: {console}",
    )
    ok("get_console_output answers for the instance, with no output before any")


def terminate(ec2, ids, retention):
    asked = time.monotonic()
    answer = ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
    check(sorted(t["InstanceId"] for t in answer) == sorted(ids), f"terminated {answer}")
    check(
        all(t["CurrentState"]["Name"] in ("shutting-down", "terminated") for t in answer),
        f"terminate_instances answered {[t['CurrentState'] for t in answer]}",
    )
    wait(ec2, "instance_terminated", ids)
    now = states(ec2, ids)
    check(set(now.values()) == {"terminated"}, f"after the instance_terminated waiter: {now}")
    ok(f"terminate_instances + waiter instance_terminated: all {len(ids)} terminated")

    # Each instance is collected once its own retention is over (their transition times may
    # differ by a second): wait until a plain describe shows none of them.
    def collected():
        left = {i["InstanceId"] for i in all_instances(ec2)} & set(ids)
        return (True if not left else None), f"still described: {sorted(left)}"

    started = time.monotonic()
    poll("the terminated instances are collected", retention + 30, collected)
    visible_for = time.monotonic() - asked
    # The transition time has whole seconds: allow one second of rounding, never more.
    check(
        visible_for >= retention - 1,
        f"collected {visible_for:.1f} s after terminate_instances; the retention is {retention} s",
    )
    expect_error("InvalidInstanceID.NotFound", ec2.describe_instances, InstanceIds=ids)
    ok(f"after the retention ({retention} s) the instances are gone "
       f"({time.monotonic() - started:.1f} s after the waiter): describe by ID is NotFound")


def cleanup(ec2, image_id):
    ec2.delete_key_pair(KeyName="boto-key")
    names = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]]
    check("boto-key" not in names, f"after delete_key_pair the key pairs are {names}")
    ec2.deregister_image(ImageId=image_id)
    mine = [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]]
    check(image_id not in mine, f"after deregister_image the images are {mine}")
    ok("delete_key_pair and deregister_image")


def main():
    if len(sys.argv) != 3:
        print(f"usage: {sys.argv[0]} <retention seconds> <image location>", file=sys.stderr)
        return 2
    retention, location = int(sys.argv[1]), sys.argv[2]
    # One attempt per call: a retry must never hide an error of the gateway.
    ec2 = boto3.client("ec2", config=Config(retries={"total_max_attempts": 1}))
    try:
        check_endpoint(ec2)
        key_pair(ec2)
        image_id = image(ec2, location)
        ids = launch(ec2, image_id)
        more_ids = pagination(ec2, image_id, ids)
        stop_modify_start(ec2, ids)
        terminate(ec2, ids + more_ids, retention)
        cleanup(ec2, image_id)
    except Failure as e:
        print(f"FAIL after {STEPS} steps: {e}", flush=True)
        return 1
    except ClientError as e:
        print(f"FAIL after {STEPS} steps: unexpected API error: {e}", flush=True)
        return 1
    except BotoCoreError as e:
        print(f"FAIL after {STEPS} steps: the request did not get an answer: {e}", flush=True)
        return 1
    print(f"passed: {STEPS} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
