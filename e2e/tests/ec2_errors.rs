//! Refusals of the EC2 face against a real gateway on real etcd: every case asserts the AWS
//! error code read from the XML error document (`<Response><Errors><Error><Code>`) and the
//! HTTP status. Requests are signed exactly by botocore (`SigV4Auth`, `SigV4QueryAuth`, boto3's
//! `generate_presigned_url`) in `e2e/python/ec2_driver.py` and sent raw with reqwest, so a case
//! can break one thing (the secret, the clock, the body) and nothing else. Expired signatures
//! are made by signing with a clock moved into the past, never by waiting.

mod ec2_support;

use anyhow::{ensure, Context};
use ec2_support::{
    apply_catalogue, aws_error_code, send, signed_post, signed_post_to, unsigned_post, xml_texts,
    Driver, Raw, Reply, VERSION,
};
use karri_testkit::{AwsCredentials, Etcd, Gateway, Tokens};
use serde_json::{json, Value};

/// The gateway's limit on an EC2 request body (`MAX_EC2_BODY`).
const MAX_BODY: usize = 1024 * 1024;

/// A gateway on etcd with one account, and a boto3 driver signing with its key.
struct Setup {
    driver: Driver,
    creds: AwsCredentials,
    gateway: Gateway,
    _etcd: Etcd,
}

async fn setup() -> anyhow::Result<Setup> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let (_, creds) = gateway.account_with_key(&tokens.admin, "errors").await?;
    let driver = Driver::start(&gateway, &creds, "errors")?;
    Ok(Setup {
        driver,
        creds,
        gateway,
        _etcd: etcd,
    })
}

/// `Action=<action>&Version=2016-11-15` followed by `rest` (already form-encoded).
fn form(action: &str, rest: &str) -> String {
    if rest.is_empty() {
        format!("Action={action}&Version={VERSION}")
    } else {
        format!("Action={action}&Version={VERSION}&{rest}")
    }
}

/// Whether `reply` is a 200 whose XML document has root `root` with a request ID.
fn is_success(reply: &Reply, root: &str) -> bool {
    reply.status == 200 && !xml_texts(&reply.body, &[root, "requestId"]).is_empty()
}

/// Checks each `(name, reply, expected code, expected status)`; fails naming every row that
/// did not get its answer.
fn check_refusals(rows: &[(&str, Reply, &str, u16)]) -> anyhow::Result<()> {
    let mut wrong = Vec::new();
    for (name, reply, code, status) in rows {
        match reply.error() {
            Ok((got, got_status)) if got == *code && got_status == *status => {}
            Ok((got, got_status)) => wrong.push(format!(
                "{name}: expected {code}/{status}, got {got}/{got_status}: {}",
                reply.body
            )),
            Err(e) => wrong.push(format!("{name}: expected {code}/{status}, got {e:#}")),
        }
    }
    ensure!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_signatures_stale_clocks_unknown_keys_and_missing_auth_are_refused(
) -> anyhow::Result<()> {
    let mut s = setup().await?;
    let gw = &s.gateway;
    let body = form("DescribeInstances", "");
    let mut sign = |overrides: Value| signed_post(&mut s.driver, gw, &body, overrides);

    // Controls: the same request signed now, and signed 10 minutes ago (inside the 15-minute
    // tolerance), is served, so each refusal below is due to the one thing it breaks.
    let now = send(gw, &sign(json!({}))?).await?;
    ensure!(
        is_success(&now, "DescribeInstancesResponse"),
        "a request signed now: {} {}",
        now.status,
        now.body
    );
    let ten_minutes_ago = send(gw, &sign(json!({"skew_seconds": -600}))?).await?;
    ensure!(
        is_success(&ten_minutes_ago, "DescribeInstancesResponse"),
        "a request signed 10 minutes ago: {} {}",
        ten_minutes_ago.status,
        ten_minutes_ago.body
    );

    let wrong_secret = format!("{}x", s.creds.secret_access_key);
    let mut tampered = sign(json!({}))?;
    tampered.body = form("DescribeInstances", "InstanceId.1=i-0123456789abcdef0").into_bytes();
    let rows = [
        (
            "signed with the wrong secret",
            send(gw, &sign(json!({"secret_key": wrong_secret}))?).await?,
            "SignatureDoesNotMatch",
            403,
        ),
        (
            "body changed after signing",
            send(gw, &tampered).await?,
            "SignatureDoesNotMatch",
            403,
        ),
        (
            "signed 20 minutes ago",
            send(gw, &sign(json!({"skew_seconds": -1200}))?).await?,
            "RequestExpired",
            400,
        ),
        (
            "signed 20 minutes in the future",
            send(gw, &sign(json!({"skew_seconds": 1200}))?).await?,
            "RequestExpired",
            400,
        ),
        (
            "unknown access key",
            send(gw, &sign(json!({"access_key": "AKIKUNKNOWNKEY000000"}))?).await?,
            "AuthFailure",
            401,
        ),
        (
            "a session token (temporary credentials, which Karri never issues)",
            send(gw, &sign(json!({"session_token": "FQoGZXIvYXdzEXAMPLE"}))?).await?,
            "AuthFailure",
            401,
        ),
        (
            "no authentication at all",
            send(gw, &unsigned_post(gw, &body)).await?,
            "MissingAuthenticationToken",
            401,
        ),
    ];
    check_refusals(&rows)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_endpoint_url_has_a_path_gets_ec2_answers_never_the_resource_apis(
) -> anyhow::Result<()> {
    let mut s = setup().await?;
    let gw = &s.gateway;
    let url = format!("{}/compute/v1", gw.url());
    let body = form("DescribeRegions", "");
    let served = send(
        gw,
        &signed_post_to(&mut s.driver, url.clone(), &body, json!({}))?,
    )
    .await?;
    ensure!(
        is_success(&served, "DescribeRegionsResponse"),
        "DescribeRegions at {url}: {} {}",
        served.status,
        served.body
    );
    let wrong_secret = format!("{}x", s.creds.secret_access_key);
    let refused = send(
        gw,
        &signed_post_to(
            &mut s.driver,
            url,
            &body,
            json!({"secret_key": wrong_secret}),
        )?,
    )
    .await?;
    check_refusals(&[(
        "signed with the wrong secret, at a path",
        refused,
        "SignatureDoesNotMatch",
        403,
    )])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_presigned_url_is_served_until_it_expires() -> anyhow::Result<()> {
    let mut s = setup().await?;
    let gw = &s.gateway;
    let get = |url: &str| Raw {
        method: reqwest::Method::GET,
        url: url.to_string(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    let url_of = |answer: Value| -> anyhow::Result<String> {
        Ok(answer
            .get("url")
            .and_then(Value::as_str)
            .context("no url")?
            .to_string())
    };
    let base = format!("{}/", gw.url());
    let query = form("DescribeInstances", "");
    let mut presign = |expires: u64, skew_seconds: i64| -> anyhow::Result<String> {
        url_of(s.driver.request(&json!({
            "op": "presign", "url": base, "query": query,
            "expires": expires, "skew_seconds": skew_seconds
        }))?)
    };
    let fresh = presign(60, 0)?;
    let two_minutes_old_for_five = presign(300, -120)?;
    let expired = presign(60, -120)?;
    let mut boto3_url = |http_method: Value| -> anyhow::Result<String> {
        url_of(s.driver.request(&json!({
            "op": "generate_presigned_url", "method": "describe_instances", "expires": 60,
            "http_method": http_method
        }))?)
    };
    let boto3_get = boto3_url(json!("GET"))?;
    // boto3 signs EC2's presigned URLs for POST unless told otherwise: they are posted, empty.
    let boto3_post = boto3_url(Value::Null)?;
    ensure!(
        expired.contains("X-Amz-Expires=60") && expired.contains("X-Amz-Signature="),
        "not a SigV4 presigned URL: {expired}"
    );

    let post = |url: &str| Raw {
        method: reqwest::Method::POST,
        ..get(url)
    };
    for (name, raw) in [
        ("boto3's generate_presigned_url for GET", get(&boto3_get)),
        ("boto3's generate_presigned_url, posted", post(&boto3_post)),
        ("SigV4QueryAuth signed now for 60 s", get(&fresh)),
        (
            "SigV4QueryAuth signed 2 minutes ago for 300 s",
            get(&two_minutes_old_for_five),
        ),
    ] {
        let reply = send(gw, &raw).await?;
        ensure!(
            is_success(&reply, "DescribeInstancesResponse"),
            "{name}: {} {}",
            reply.status,
            reply.body
        );
    }
    // Over HTTP/2 the host comes as `:authority`, and the signature still holds.
    let (version, reply) = curl_http2(gw, &fresh)?;
    ensure!(
        version == "2" && is_success(&reply, "DescribeInstancesResponse"),
        "curl --http2 (HTTP/{version}): {} {}",
        reply.status,
        reply.body
    );
    let other_action = fresh.replace("Action=DescribeInstances", "Action=DescribeRegions");
    ensure!(
        other_action != fresh,
        "the action is not in the URL: {fresh}"
    );
    let rows = [
        (
            "signed 2 minutes ago for 60 s",
            send(gw, &get(&expired)).await?,
            "RequestExpired",
            400,
        ),
        (
            "action changed after presigning",
            send(gw, &get(&other_action)).await?,
            "SignatureDoesNotMatch",
            403,
        ),
    ];
    check_refusals(&rows)
}

/// GETs `url` with curl over HTTP/2: the HTTP version used and the reply.
fn curl_http2(gateway: &Gateway, url: &str) -> anyhow::Result<(String, Reply)> {
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--http2", "--cacert"])
        .arg(gateway.ca_path())
        .args(["--write-out", "\n%{http_code} %{http_version}", url])
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, last) = text.rsplit_once('\n').context("no status line")?;
    let (status, version) = last.split_once(' ').context("no HTTP version")?;
    let reply = Reply {
        status: status.parse()?,
        body: body.to_string(),
    };
    Ok((version.to_string(), reply))
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_unsupported_and_malformed_requests_are_refused_with_the_aws_code(
) -> anyhow::Result<()> {
    let mut s = setup().await?;
    s.driver.upload_image_object("images/there.img")?;
    let gw = &s.gateway;
    let run = "ImageId=emi-0123456789abcdef0&InstanceType=t1.micro";
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str, u16)> = vec![
        ("unknown action", form("Frobnicate", ""), "InvalidAction", 400),
        ("real EC2 action Karri lacks", form("CreateVolume", "Size=8&AvailabilityZone=karri-1a"), "UnsupportedOperation", 400),
        ("no Action", format!("Version={VERSION}"), "MissingAction", 400),
        ("RunInstances without ImageId", form("RunInstances", "InstanceType=t1.micro&MinCount=1&MaxCount=1"), "MissingParameter", 400),
        ("MinCount not a number", form("RunInstances", &format!("{run}&MinCount=abc&MaxCount=1")), "InvalidParameterValue", 400),
        ("MinCount zero", form("RunInstances", &format!("{run}&MinCount=0&MaxCount=1")), "InvalidParameterValue", 400),
        ("MaxResults over 1000", form("DescribeInstances", "MaxResults=2000"), "InvalidParameterValue", 400),
        // An account's images are in S3: a path on a node or a URL would boot a host's file.
        ("RegisterImage of a node path", form("RegisterImage", "Name=host-file&ImageLocation=%2Fetc%2Fshadow"), "InvalidParameterValue", 400),
        ("RegisterImage of a URL", form("RegisterImage", "Name=local-url&ImageLocation=http%3A%2F%2F127.0.0.1%3A9%2Fdisk.raw"), "InvalidParameterValue", 400),
        // Nothing to boot: as EC2 refuses a manifest it cannot read.
        ("RegisterImage of a missing object", form("RegisterImage", "Name=no-object&ImageLocation=images/nothing.img"), "InvalidManifest", 400),
        ("RegisterImage in a missing bucket", form("RegisterImage", "Name=no-bucket&ImageLocation=no-such-bucket/disk.img"), "InvalidManifest", 400),
        ("unknown instance ID", form("DescribeInstances", "InstanceId.1=i-0123456789abcdef0"), "InvalidInstanceID.NotFound", 400),
        ("terminate an unknown instance ID", form("TerminateInstances", "InstanceId.1=i-0123456789abcdef0"), "InvalidInstanceID.NotFound", 400),
        ("malformed instance ID", form("DescribeInstances", "InstanceId.1=i-123"), "InvalidInstanceID.Malformed", 400),
        ("terminate a malformed instance ID", form("TerminateInstances", "InstanceId.1=i-123"), "InvalidInstanceID.Malformed", 400),
    ];
    let mut rows = Vec::with_capacity(cases.len());
    for (name, body, code, status) in cases {
        let reply = send(gw, &signed_post(&mut s.driver, gw, &body, json!({}))?).await?;
        rows.push((name, reply, code, status));
    }
    check_refusals(&rows)?;
    let left = s.driver.ok("describe_instances", json!({}))?;
    ensure!(
        left["Reservations"] == json!([]),
        "refused requests left instances behind: {left}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_indexed_from_zero_or_not_indexed_are_read_as_apache_libcloud_sends_them(
) -> anyhow::Result<()> {
    let mut s = setup().await?;
    let gw = &s.gateway;
    s.driver
        .ok("create_key_pair", json!({"KeyName": "libcloud"}))?;
    for rest in ["KeyName=libcloud", "KeyName.0=libcloud"] {
        let body = form("DescribeKeyPairs", rest);
        let reply = send(gw, &signed_post(&mut s.driver, gw, &body, json!({}))?).await?;
        ensure!(
            is_success(&reply, "DescribeKeyPairsResponse")
                && xml_texts(
                    &reply.body,
                    &["DescribeKeyPairsResponse", "keySet", "item", "keyName"]
                ) == ["libcloud"],
            "DescribeKeyPairs {rest}: {} {}",
            reply.status,
            reply.body
        );
    }
    // The bare name is read, not ignored: another name is not found.
    let body = form("DescribeKeyPairs", "KeyName=nobody");
    let reply = send(gw, &signed_post(&mut s.driver, gw, &body, json!({}))?).await?;
    check_refusals(&[(
        "a bare KeyName that does not exist",
        reply,
        "InvalidKeyPair.NotFound",
        400,
    )])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_answers_dry_run_operation_with_412_and_changes_nothing() -> anyhow::Result<()> {
    let mut s = setup().await?;
    s.driver.upload_image_object("images/dry.img")?;
    let gw = &s.gateway;
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str, u16)> = vec![
        ("CreateKeyPair", form("CreateKeyPair", "KeyName=dry&DryRun=true"), "DryRunOperation", 412),
        ("RegisterImage", form("RegisterImage", "Name=dry-image&ImageLocation=images/dry.img&DryRun=true"), "DryRunOperation", 412),
        ("DescribeInstances", form("DescribeInstances", "DryRun=true"), "DryRunOperation", 412),
        ("DescribeKeyPairs", form("DescribeKeyPairs", "DryRun=true"), "DryRunOperation", 412),
        // A dry run still checks its arguments: what would fail fails with its own code.
        ("TerminateInstances of an unknown ID", form("TerminateInstances", "InstanceId.1=i-0123456789abcdef0&DryRun=true"), "InvalidInstanceID.NotFound", 400),
    ];
    let mut rows = Vec::with_capacity(cases.len());
    for (name, body, code, status) in cases {
        let reply = send(gw, &signed_post(&mut s.driver, gw, &body, json!({}))?).await?;
        rows.push((name, reply, code, status));
    }
    // boto3 reads the same answer.
    let boto = s
        .driver
        .call("describe_instances", json!({"DryRun": true}))?;
    let got = boto.refusal("boto3 describe_instances DryRun=True")?;
    ensure!(
        got == ("DryRunOperation".to_string(), 412),
        "boto3 describe_instances DryRun=True: {got:?}"
    );
    check_refusals(&rows)?;
    let keys = s.driver.ok("describe_key_pairs", json!({}))?;
    ensure!(
        keys["KeyPairs"] == json!([]),
        "a dry run created a key pair: {keys}"
    );
    let images = s
        .driver
        .ok("describe_images", json!({"Owners": ["self"]}))?;
    ensure!(
        images["Images"] == json!([]),
        "a dry run registered an image: {images}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_size_limit_is_a_client_error_never_a_server_error() -> anyhow::Result<()> {
    let mut s = setup().await?;
    let gw = &s.gateway;
    let prefix = form(
        "RunInstances",
        "ImageId=emi-0123456789abcdef0&InstanceType=t1.micro&MinCount=1&MaxCount=1&UserData=",
    );
    let body = format!("{prefix}{}", "A".repeat(MAX_BODY + 1 - prefix.len()));
    ensure!(body.len() == MAX_BODY + 1, "body of {} bytes", body.len());
    let signed = signed_post(&mut s.driver, gw, &body, json!({}))?;
    let rows = [
        (
            "signed body one byte over the limit",
            send(gw, &signed).await?,
            "InvalidParameterValue",
            400,
        ),
        (
            "unsigned body one byte over the limit",
            send(gw, &unsigned_post(gw, &body)).await?,
            "InvalidParameterValue",
            400,
        ),
    ];
    check_refusals(&rows)?;
    // The gateway is still serving.
    let after = s.driver.ok("describe_instances", json!({}))?;
    ensure!(after["Reservations"] == json!([]), "{after}");
    Ok(())
}

#[test]
fn the_error_code_is_read_from_the_ec2_error_document() {
    let doc = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
               <Code>InvalidInstanceID.Malformed</Code><Message>Invalid id: &quot;i-1&quot;</Message>\
               </Error></Errors><RequestID>r</RequestID></Response>";
    assert_eq!(
        aws_error_code(doc).as_deref(),
        Some("InvalidInstanceID.Malformed")
    );
    assert_eq!(
        xml_texts(doc, &["Response", "Errors", "Error", "Message"]),
        vec!["Invalid id: \"i-1\"".to_string()]
    );
    let ok = "<DescribeInstancesResponse xmlns=\"x\"><requestId>r</requestId><reservationSet/>\
              </DescribeInstancesResponse>";
    assert_eq!(aws_error_code(ok), None);
    assert_eq!(
        xml_texts(ok, &["DescribeInstancesResponse", "requestId"]),
        vec!["r".to_string()]
    );
    // A code outside <Response><Errors><Error> is not an error document.
    assert_eq!(aws_error_code("<Error><Code>X</Code></Error>"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_never_reached_running_cannot_be_stopped() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    apply_catalogue(&gateway, &tokens.admin).await?;
    let (_, creds) = gateway.account_with_key(&tokens.admin, "pending").await?;
    let mut aws = Driver::start(&gateway, &creds, "pending")?;
    aws.upload_image_object("images/pending.img")?;
    let image = aws.ok(
        "register_image",
        json!({"Name": "pending-image", "ImageLocation": "images/pending.img"}),
    )?;
    let ran = aws.ok(
        "run_instances",
        json!({"ImageId": image["ImageId"], "InstanceType": "t1.micro",
               "MinCount": 1, "MaxCount": 1}),
    )?;
    let id = ran["Instances"][0]["InstanceId"]
        .as_str()
        .context("no InstanceId")?
        .to_string();
    // No node runs it: it stays pending, on its first way up.
    let refused = aws
        .call("stop_instances", json!({"InstanceIds": [id]}))?
        .refusal("stop_instances of a pending instance")?;
    ensure!(
        refused == ("IncorrectInstanceState".to_string(), 400),
        "stop_instances of a pending instance: {refused:?}"
    );
    let described = aws.ok("describe_instances", json!({"InstanceIds": [id]}))?;
    let state = &described["Reservations"][0]["Instances"][0]["State"]["Name"];
    ensure!(state == "pending", "after the refused stop it is {state}");
    // It can still be terminated.
    let terminating = aws.ok("terminate_instances", json!({"InstanceIds": [id]}))?;
    ensure!(
        terminating["TerminatingInstances"][0]["InstanceId"] == id.as_str(),
        "{terminating}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_launch_is_refused_as_the_launch_would_be_naming_the_parameter_at_fault(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    apply_catalogue(&gateway, &tokens.admin).await?;
    let (_, creds) = gateway.account_with_key(&tokens.admin, "dry").await?;
    let mut aws = Driver::start(&gateway, &creds, "dry")?;
    aws.upload_image_object("images/dry.img")?;
    let image = aws.ok(
        "register_image",
        json!({"Name": "dry-image", "ImageLocation": "images/dry.img"}),
    )?;
    let launch = |extra: Value| {
        let mut params = json!({"ImageId": image["ImageId"], "InstanceType": "t1.micro",
                                "MinCount": 1, "MaxCount": 1});
        for (k, v) in extra.as_object().into_iter().flatten() {
            params[k] = v.clone();
        }
        params
    };
    let bell = json!([{"ResourceType": "instance",
                       "Tags": [{"Key": "Name", "Value": "ok"}, {"Key": "note", "Value": "a\u{7}b"}]}]);
    // A machine image given as kernel or ramdisk is answered as RegisterImage answers it.
    #[rustfmt::skip]
    let cases = [
        ("a machine image as kernel", json!({"KernelId": image["ImageId"]}), "InvalidAKIID.NotFound", "kernel image"),
        ("a machine image as ramdisk", json!({"RamdiskId": image["ImageId"]}), "InvalidARIID.NotFound", "ramdisk image"),
        ("a tag holding a bell", json!({"TagSpecifications": bell}), "InvalidParameterValue", "TagSpecification"),
    ];
    for (what, extra, code, parameter) in cases {
        for dry in [true, false] {
            let mut params = launch(extra.clone());
            params["DryRun"] = json!(dry);
            let answer = aws.call("run_instances", params)?;
            let label = format!("run_instances with {what} (DryRun={dry})");
            let got = answer.refusal(&label)?;
            ensure!(
                got == (code.to_string(), 400),
                "{label}: {got:?} {}",
                answer.message
            );
            ensure!(
                answer.message.contains(parameter)
                    && !answer.message.contains("\"i-")
                    && !answer.message.contains(" i-"),
                "{label} says {:?}, which should name {parameter} and no instance",
                answer.message
            );
        }
    }
    let dry = aws
        .call("run_instances", {
            let mut p = launch(json!({}));
            p["DryRun"] = json!(true);
            p
        })?
        .refusal("run_instances DryRun=True")?;
    ensure!(
        dry == ("DryRunOperation".to_string(), 412),
        "a valid dry-run launch: {dry:?}"
    );
    let described = aws.ok("describe_instances", json!({}))?;
    ensure!(
        described["Reservations"] == json!([]),
        "a refused or dry-run launch made instances: {described}"
    );
    // A dry run claims no client token: the launch that follows with it is made.
    let with_token = |dry: bool| {
        let mut p = launch(json!({"ClientToken": "dry-then-real"}));
        p["DryRun"] = json!(dry);
        p
    };
    let dry = aws
        .call("run_instances", with_token(true))?
        .refusal("run_instances DryRun=True with a client token")?;
    ensure!(
        dry == ("DryRunOperation".to_string(), 412),
        "a dry run with a client token: {dry:?}"
    );
    let made = aws.ok("run_instances", with_token(false))?;
    ensure!(
        made["Instances"].as_array().is_some_and(|i| i.len() == 1),
        "the launch after a dry run with its token: {made}"
    );
    Ok(())
}
