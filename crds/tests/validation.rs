//! Admission rules, row by row: what `validate_object` accepts and the message it refuses with.

use serde_json::{json, Value};

/// Runs admission on a record of `kind` with `spec`, returning the refusal message.
fn admit(kind: &str, spec: Value) -> Result<(), String> {
    let object = json!({
        "apiVersion": crds::API_VERSION,
        "kind": kind,
        "metadata": { "name": "sample" },
        "spec": spec,
    });
    crds::validate_object(kind, &object).map_err(|e| e.to_string())
}

/// `base` with `key` set to `value` (or removed when `value` is null).
fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut out = base.clone();
    if let Some(map) = out.as_object_mut() {
        if value.is_null() {
            map.remove(key);
        } else {
            map.insert(key.to_owned(), value);
        }
    }
    out
}

fn instance() -> Value {
    json!({
        "imageId": "emi-0123456789abcdef0",
        "instanceType": "m1.small",
        "securityGroupIds": ["sg-0123456789abcdef0"],
        "userData": "aGVsbG8=",
    })
}

fn check_rows(kind: &str, rows: &[(&str, Value, Result<(), &str>)]) {
    for (label, spec, expected) in rows {
        let got = admit(kind, spec.clone());
        assert_eq!(
            got.as_ref().map(|_| ()).map_err(String::as_str),
            *expected,
            "{kind}: {label}"
        );
    }
}

#[test]
fn instance_specs_are_checked_field_by_field() {
    let base = instance();
    let rows = [
        ("a complete spec", base.clone(), Ok(())),
        ("ami- image ids", with(&base, "imageId", json!("ami-0123456789abcdef0")), Ok(())),
        ("minimal spec", json!({"imageId": "emi-0123456789abcdef0", "instanceType": "t1.micro"}), Ok(())),
        ("stopped", with(&base, "desiredState", json!("stopped")), Ok(())),
        (
            "short image id",
            with(&base, "imageId", json!("emi-0123")),
            Err("spec.imageId must look like emi-0123456789abcdef0"),
        ),
        (
            "wrong image prefix",
            with(&base, "imageId", json!("i-0123456789abcdef0")),
            Err("spec.imageId must look like emi-0123456789abcdef0"),
        ),
        ("empty instance type", with(&base, "instanceType", json!("")), Err("spec.instanceType must not be empty")),
        (
            "bad security group",
            with(&base, "securityGroupIds", json!(["sg-0123456789abcdef0", "default"])),
            Err("spec.securityGroupIds[1] must look like sg-0123456789abcdef0"),
        ),
        ("user data not base64", with(&base, "userData", json!("#!/bin/sh")), Err("spec.userData must be base64-encoded")),
        (
            "client token too long",
            with(&base, "clientToken", json!("x".repeat(65))),
            Err("spec.clientToken must be 1 to 64 printable ASCII characters"),
        ),
        (
            "bad zone",
            with(&base, "availabilityZone", json!("Karri 1A")),
            Err("spec.availabilityZone must be a lowercase name such as karri-1a"),
        ),
        ("missing image id", with(&base, "imageId", Value::Null), Err("spec is malformed: missing field `imageId`")),
        (
            "unknown desired state",
            with(&base, "desiredState", json!("paused")),
            Err("spec.desiredState is malformed: unknown variant `paused`, expected one of `running`, `stopped`, `terminated`"),
        ),
        ("misspelt field", with(&base, "imageID", json!("emi-0123456789abcdef0")), Err("spec.imageID is not a known field")),
    ];
    check_rows("Instance", &rows);
}

#[test]
fn instance_with_malformed_image_id_is_rejected() {
    let err = admit(
        "Instance",
        with(&instance(), "imageId", json!("emi-0123456789ABCDEF0")),
    );
    assert_eq!(
        err,
        Err("spec.imageId must look like emi-0123456789abcdef0".to_owned())
    );
}

#[test]
fn instance_with_user_data_over_16_kib_is_rejected() {
    use base64::Engine as _;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 16 * 1024 + 1]);
    let err = admit("Instance", with(&instance(), "userData", json!(big)));
    assert_eq!(
        err,
        Err("spec.userData must decode to at most 16384 bytes".to_owned())
    );
}

#[test]
fn node_specs_are_checked_field_by_field() {
    let base = json!({"availabilityZone": "karri-1a", "hypervisor": {"domainType": "qemu", "maxInstances": 4}});
    let rows = [
        ("a complete spec", base.clone(), Ok(())),
        ("unschedulable", with(&base, "unschedulable", json!(true)), Ok(())),
        ("empty zone", with(&base, "availabilityZone", json!("")), Err("spec.availabilityZone must be a lowercase name such as karri-1a")),
        (
            "zero max instances",
            with(&base, "hypervisor", json!({"maxInstances": 0})),
            Err("spec.hypervisor.maxInstances must be at least 1 (set spec.unschedulable to drain a node)"),
        ),
        (
            "unknown domain type",
            with(&base, "hypervisor", json!({"domainType": "xen"})),
            Err("spec.hypervisor.domainType is malformed: unknown variant `xen`, expected `kvm` or `qemu`"),
        ),
        (
            "misspelt hint",
            with(&base, "hypervisor", json!({"cpumodel": "qemu64"})),
            Err("spec.hypervisor.cpumodel is not a known field"),
        ),
    ];
    check_rows("Node", &rows);
}

#[test]
fn node_with_negative_capacity_is_rejected() {
    let object = json!({
        "apiVersion": crds::API_VERSION,
        "kind": "Node",
        "metadata": {"name": "hv-01"},
        "spec": {"availabilityZone": "karri-1a"},
        "status": {"capacity": {"vcpus": -1, "memoryMiB": 1024, "diskGiB": 10}},
    });
    let err = crds::validate_object("Node", &object).map_err(|e| e.to_string());
    let message = err.expect_err("negative vcpus refused");
    assert!(
        message.starts_with("status.capacity.vcpus is malformed:"),
        "{message}"
    );
}

#[test]
fn node_allocating_more_than_its_capacity_is_rejected() {
    let object = json!({
        "apiVersion": crds::API_VERSION,
        "kind": "Node",
        "metadata": {"name": "hv-01"},
        "spec": {"availabilityZone": "karri-1a"},
        "status": {
            "capacity": {"vcpus": 4, "memoryMiB": 8192, "diskGiB": 100},
            "allocatable": {"vcpus": 4, "memoryMiB": 9000, "diskGiB": 100},
            "addresses": [{"type": "InternalIP", "address": "10.0.0.11"}],
        },
    });
    let err = crds::validate_object("Node", &object).map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err("status.allocatable.memoryMiB must not exceed status.capacity.memoryMiB".to_owned())
    );
}

#[test]
fn instance_type_specs_are_checked_field_by_field() {
    let base = json!({"vcpus": 1, "memoryMiB": 512, "diskGiB": 10});
    let rows = [
        ("m1.small", base.clone(), Ok(())),
        (
            "smallest memory",
            with(&base, "memoryMiB", json!(64)),
            Ok(()),
        ),
        (
            "no vcpus",
            with(&base, "vcpus", json!(0)),
            Err("spec.vcpus must be at least 1"),
        ),
        (
            "too little memory",
            with(&base, "memoryMiB", json!(63)),
            Err("spec.memoryMiB must be at least 64"),
        ),
        (
            "no disk",
            with(&base, "diskGiB", json!(0)),
            Err("spec.diskGiB must be at least 1"),
        ),
        (
            "memory as text",
            with(&base, "memoryMiB", json!("512Mi")),
            Err("spec.memoryMiB is malformed: invalid type: string \"512Mi\", expected u64"),
        ),
    ];
    check_rows("InstanceType", &rows);
}

#[test]
fn image_specs_are_checked_field_by_field() {
    let base =
        json!({"name": "karri-micro", "imageLocation": "https://images.example.org/micro.qcow2"});
    let rows = [
        ("minimal spec", base.clone(), Ok(())),
        ("bucket/key location", with(&base, "imageLocation", json!("images/micro/manifest.xml")), Ok(())),
        ("kernel and ramdisk", with(&with(&base, "kernelId", json!("eki-0123456789abcdef0")), "ramdiskId", json!("eri-0123456789abcdef0")), Ok(())),
        ("short name", with(&base, "name", json!("ab")), Err("spec.name must be 3 to 128 letters, digits or ()[] ./-'@_")),
        ("location with spaces", with(&base, "imageLocation", json!("my image.qcow2")), Err("spec.imageLocation must be a URL or bucket/key without spaces, or an absolute path")),
        ("URL with a space", with(&base, "imageLocation", json!("https://images.example.org/my image.qcow2")), Err("spec.imageLocation must be a URL or bucket/key without spaces, or an absolute path")),
        ("path with a space", with(&base, "imageLocation", json!("/srv/my cloud/images/micro.raw")), Ok(())),
        ("path with a tab", with(&base, "imageLocation", json!("/srv/my\tcloud/micro.raw")), Err("spec.imageLocation must be a URL or bucket/key without spaces, or an absolute path")),
        ("short checksum", with(&base, "checksumSha256", json!("abc")), Err("spec.checksumSha256 must be 64 lowercase hex digits")),
        ("odd root device", with(&base, "rootDeviceName", json!("vda")), Err("spec.rootDeviceName must look like /dev/vda")),
        ("unknown architecture", with(&base, "architecture", json!("sparc")), Err("spec.architecture is malformed: unknown variant `sparc`, expected one of `x86_64`, `i386`, `arm64`")),
        ("ramdisk without kernel", with(&base, "ramdiskId", json!("eri-0123456789abcdef0")), Err("spec.ramdiskId must come with spec.kernelId")),
        ("bad kernel id", with(&base, "kernelId", json!("emi-0123456789abcdef0")), Err("spec.kernelId must look like eki-0123456789abcdef0")),
    ];
    check_rows("Image", &rows);
}

#[test]
fn account_and_zone_specs_are_checked_field_by_field() {
    check_rows(
        "Account",
        &[
            ("empty spec", json!({}), Ok(())),
            (
                "email",
                json!({"email": "ops@example.org", "displayName": "Ops"}),
                Ok(()),
            ),
            (
                "bad email",
                json!({"email": "ops"}),
                Err("spec.email must be an email address such as ops@example.com"),
            ),
            (
                "blank display name",
                json!({"displayName": " "}),
                Err("spec.displayName must not be empty"),
            ),
        ],
    );
    check_rows(
        "AvailabilityZone",
        &[
            ("region", json!({"region": "karri-1"}), Ok(())),
            (
                "bad region",
                json!({"region": "Karri_1"}),
                Err("spec.region must be a lowercase name such as karri-1"),
            ),
            (
                "no region",
                json!({}),
                Err("spec is malformed: missing field `region`"),
            ),
        ],
    );
}

#[test]
fn record_without_spec_is_rejected() {
    let object =
        json!({"apiVersion": crds::API_VERSION, "kind": "Instance", "metadata": {"name": "x"}});
    let err = crds::validate_object("Instance", &object).map_err(|e| e.to_string());
    assert_eq!(err, Err("spec is required".to_owned()));
}

#[test]
fn record_of_another_group_or_kind_is_rejected() {
    let object = json!({"apiVersion": "v1", "kind": "Instance", "spec": instance()});
    assert_eq!(
        crds::validate_object("Instance", &object).map_err(|e| e.to_string()),
        Err("apiVersion must be karri.dev/v1alpha1, not v1".to_owned())
    );
    let object = json!({"apiVersion": crds::API_VERSION, "kind": "Image", "spec": instance()});
    assert_eq!(
        crds::validate_object("Instance", &object).map_err(|e| e.to_string()),
        Err("kind must be Instance, not Image".to_owned())
    );
    assert_eq!(
        crds::validate_object("Pod", &object).map_err(|e| e.to_string()),
        Err("kind Pod is not a karri.dev/v1alpha1 kind".to_owned())
    );
}

#[test]
fn unknown_top_level_and_status_fields_are_rejected() {
    let object = json!({"apiVersion": crds::API_VERSION, "kind": "Instance", "spec": instance(), "extra": 1});
    assert_eq!(
        crds::validate_object("Instance", &object).map_err(|e| e.to_string()),
        Err("extra is not a known field".to_owned())
    );
    let object = json!({
        "apiVersion": crds::API_VERSION,
        "kind": "Instance",
        "spec": instance(),
        "status": {"state": "running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z", "severity": "x"}]},
    });
    assert_eq!(
        crds::validate_object("Instance", &object).map_err(|e| e.to_string()),
        Err("status.conditions[0].severity is not a known field".to_owned())
    );
}

#[test]
fn instance_status_written_by_agents_is_accepted() {
    let object = json!({
        "apiVersion": crds::API_VERSION,
        "kind": "Instance",
        "metadata": {"name": "web-1", "labels": {"karri.dev/id": "i-0123456789abcdef0"}},
        "spec": instance(),
        "status": {
            "state": "running",
            "nodeName": "hv-01",
            "availabilityZone": "karri-1a",
            "privateIpAddress": "10.0.0.5",
            "launchTime": "2024-01-01T00:00:00Z",
            "observedGeneration": 2,
            "conditions": [
                {"type": "Scheduled", "status": "True", "reason": "Bound", "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"},
                {"type": "Ready", "status": "True", "reason": "Booted", "message": "", "lastTransitionTime": "2024-01-01T00:00:05Z"},
            ],
        },
    });
    assert_eq!(crds::validate_object("Instance", &object), Ok(()));
    let bad_ip = {
        let mut o = object.clone();
        o["status"]["privateIpAddress"] = json!("10.0.0.300");
        o
    };
    assert_eq!(
        crds::validate_object("Instance", &bad_ip).map_err(|e| e.to_string()),
        Err("status.privateIpAddress must be an IP address".to_owned())
    );
}

#[test]
fn validation_errors_name_their_field() {
    let err = crds::validate_object(
        "Instance",
        &json!({"spec": with(&instance(), "imageId", json!("x"))}),
    )
    .expect_err("refused");
    assert_eq!(err.field(), Some("spec.imageId"));
}

#[test]
fn id_label_of_another_kind_is_rejected() {
    let object = json!({
        "metadata": {"name": "web-1", "labels": {"karri.dev/id": "emi-0123456789abcdef0"}},
        "spec": instance(),
    });
    assert_eq!(
        crds::validate_object("Instance", &object).map_err(|e| e.to_string()),
        Err("metadata.labels.karri.dev/id must look like i-0123456789abcdef0".to_owned())
    );
}

#[test]
fn defaults_fill_missing_spec_fields_and_leave_set_ones_alone() {
    let mut instance = json!({"kind": "Instance", "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}});
    crds::apply_defaults("Instance", &mut instance).expect("Instance has a schema");
    assert_eq!(instance["spec"]["desiredState"], "running");

    let mut image = json!({"spec": {"name": "micro", "imageLocation": "/srv/micro.img", "architecture": "arm64"}});
    crds::apply_defaults("Image", &mut image).expect("Image has a schema");
    assert_eq!(
        image["spec"],
        json!({
            "name": "micro",
            "imageLocation": "/srv/micro.img",
            "architecture": "arm64",
            "rootDeviceName": "/dev/vda",
            "public": false,
            "imageType": "machine",
            "format": "raw",
        })
    );

    let mut node = json!({"spec": {"availabilityZone": "karri-1a"}, "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}});
    crds::apply_defaults("Node", &mut node).expect("Node has a schema");
    assert_eq!(node["spec"]["unschedulable"], false);
    assert_eq!(node["status"]["conditions"][0]["reason"], "");

    assert!(matches!(
        crds::apply_defaults("Pod", &mut json!({})),
        Err(crds::ValidationError::UnknownKind(kind)) if kind == "Pod"
    ));
}

#[test]
fn defaulted_specs_deserialize_to_the_serde_defaults() {
    let mut object =
        json!({"spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}});
    crds::apply_defaults("Instance", &mut object).expect("Instance has a schema");
    let typed: crds::InstanceSpec = serde_json::from_value(object["spec"].clone()).expect("spec");
    let from_serde: crds::InstanceSpec = serde_json::from_value(
        json!({"imageId": "emi-0123456789abcdef0", "instanceType": "m1.small"}),
    )
    .expect("spec");
    assert_eq!(typed, from_serde);
    assert_eq!(typed.desired_state, crds::DesiredState::Running);
}
