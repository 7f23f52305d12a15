//! RunInstances idempotency under concurrency, against a real gateway on real etcd: fifty
//! boto3 calls at once with one `ClientToken` make exactly one reservation, and every caller is
//! answered with it. No operator or node agent runs, so the instances stay `pending`; the
//! catalogue (zones, instance types) is applied with kubectl and the image registered first.
//!
//! Whether calls really race to create (rather than all but the first finding its reservation
//! already made) depends on timing, so rounds with fresh tokens run until etcd's own count of
//! applied writes shows that one round had several create attempts, the losers of which must
//! have answered with the winner's reservation.

mod ec2_support;

use std::collections::BTreeSet;

use anyhow::{ensure, Context};
use ec2_support::{apply_catalogue, Answer, Driver};
use karri_testkit::{Etcd, Gateway, Tokens};
use serde_json::{json, Value};

/// Concurrent RunInstances calls.
const CALLS: usize = 50;
/// Instances each call asks for.
const COUNT: usize = 3;
/// Most rounds of concurrent calls tried before giving up on seeing them race.
const MAX_ROUNDS: usize = 10;

/// `(ReservationId, sorted InstanceIds)` of a RunInstances answer.
fn reservation(result: &Value) -> anyhow::Result<(String, Vec<String>)> {
    let id = result["ReservationId"]
        .as_str()
        .context("no ReservationId")?
        .to_string();
    let mut instances: Vec<String> = result["Instances"]
        .as_array()
        .context("no Instances")?
        .iter()
        .filter_map(|i| i["InstanceId"].as_str().map(str::to_string))
        .collect();
    instances.sort();
    Ok((id, instances))
}

/// How many proposals (writes, including transactions whose comparison failed) etcd applied
/// so far, from its metrics.
async fn etcd_proposals(etcd: &Etcd) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{}/metrics", etcd.endpoint))
        .await?
        .text()
        .await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("etcd_server_proposals_applied_total "))
        .context("etcd has no etcd_server_proposals_applied_total")?;
    let value = line.rsplit(' ').next().unwrap_or_default();
    Ok(value.parse::<f64>()? as u64)
}

/// The most calls that were in flight at the same moment.
fn max_in_flight(answers: &[Answer]) -> anyhow::Result<usize> {
    let mut events = Vec::with_capacity(answers.len() * 2);
    for a in answers {
        let (start, end) = a.span.context("a concurrent answer without its times")?;
        events.push((start, 1i32));
        events.push((end, -1i32));
    }
    // At equal times an end comes before a start: touching calls do not overlap.
    events.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    Ok(usize::try_from(most)?)
}

/// One round: `CALLS` concurrent RunInstances with `token`, each checked to succeed with the
/// same reservation of `COUNT` instances, which DescribeInstances shows as the only one with
/// that token. Returns the reservation and how many writes etcd applied for the round (more
/// than one: several calls raced to create, and the losers answered with the winner's).
async fn round(
    aws: &mut Driver,
    etcd: &Etcd,
    params: &Value,
    account_id: &str,
) -> anyhow::Result<((String, Vec<String>), u64)> {
    let token = params["ClientToken"].as_str().context("no ClientToken")?;
    let proposals_before = etcd_proposals(etcd).await?;
    let answers = aws.concurrent("run_instances", params.clone(), CALLS, "describe_regions")?;
    let writes = etcd_proposals(etcd).await? - proposals_before;
    ensure!(answers.len() == CALLS, "{} answers", answers.len());
    let overlap = max_in_flight(&answers)?;
    eprintln!(
        "[client-token] {token}: up to {overlap} of {CALLS} calls in flight at once, \
         {writes} write(s) applied by etcd"
    );
    let mut seen = BTreeSet::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let result = answer.success(&format!("{token}: concurrent call {i}"))?;
        ensure!(
            result["OwnerId"] == json!(account_id),
            "{token}: call {i} answered for another owner: {result}"
        );
        seen.insert(reservation(&result)?);
    }
    ensure!(
        seen.len() == 1,
        "{token}: {CALLS} calls saw {} reservations: {seen:?}",
        seen.len()
    );
    let made = seen.pop_first().context("no reservation")?;
    ensure!(
        made.1.len() == COUNT,
        "{token}: the reservation has {} instances: {:?}",
        made.1.len(),
        made.1
    );
    let described = aws.ok(
        "describe_instances",
        json!({"Filters": [{"Name": "client-token", "Values": [token]}]}),
    )?;
    let reservations = described["Reservations"]
        .as_array()
        .context("no Reservations")?;
    ensure!(
        reservations.len() == 1 && reservation(&reservations[0])? == made,
        "{token}: DescribeInstances shows other than the one reservation answered: {described}"
    );
    Ok((made, writes))
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_run_instances_with_one_client_token_make_one_reservation(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    apply_catalogue(&gateway, &tokens.admin).await?;
    let (account_id, creds) = gateway.account_with_key(&tokens.admin, "tokens").await?;
    let mut aws = Driver::start(&gateway, &creds, "tokens")?;
    aws.upload_image_object("images/token.img")?;
    let image = aws.ok(
        "register_image",
        json!({"Name": "token-image", "ImageLocation": "images/token.img"}),
    )?;
    let image_id = image["ImageId"].as_str().context("no ImageId")?.to_string();
    let params = |token: &str| {
        json!({
            "ImageId": image_id, "InstanceType": "t1.micro",
            "MinCount": COUNT, "MaxCount": COUNT, "ClientToken": token,
        })
    };

    // Rounds with fresh tokens until one had calls racing to create (the first call does not
    // always finish before the others look for the token, nor always after): every round must
    // hold, and the race must have been run at least once.
    let mut reservations = BTreeSet::new();
    let mut raced = None;
    for n in 1..=MAX_ROUNDS {
        let token = format!("fifty-at-once-{n}");
        let (made, writes) = round(&mut aws, &etcd, &params(&token), &account_id).await?;
        reservations.insert(made.clone());
        if writes >= 2 {
            raced = Some((token, made));
            break;
        }
    }
    let (token, made) = raced.with_context(|| {
        format!(
            "in {MAX_ROUNDS} rounds of {CALLS} concurrent calls no two ever raced to create \
             (etcd applied one write per round): the race was not exercised"
        )
    })?;
    // The account has exactly the rounds' reservations, each of COUNT instances.
    let described = aws.ok("describe_instances", json!({}))?;
    let shown: BTreeSet<(String, Vec<String>)> = described["Reservations"]
        .as_array()
        .context("no Reservations")?
        .iter()
        .map(reservation)
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        shown == reservations
            && described["Reservations"].as_array().map(Vec::len) == Some(shown.len()),
        "DescribeInstances shows {shown:?}, the rounds made {reservations:?}"
    );

    // A later retry with the same arguments is answered with the same reservation and launches
    // nothing.
    let retry = aws.ok("run_instances", params(&token))?;
    ensure!(
        reservation(&retry)? == made,
        "a retry got another reservation: {retry}"
    );

    // The same token with another instance type is a mismatch.
    let mut other = params(&token);
    other["InstanceType"] = json!("m1.small");
    let refused = aws
        .call("run_instances", other)?
        .refusal("the token reused with another instance type")?;
    ensure!(
        refused == ("IdempotentParameterMismatch".to_string(), 400),
        "the token reused with another instance type: {refused:?}"
    );
    let all = aws.ok("describe_instances", json!({}))?;
    ensure!(all == described, "the retries changed the instances: {all}");
    Ok(())
}

/// A Describe right after a Modify sees the change: reads answer from the gateway's watch
/// cache only once it has caught up with every write already acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn a_describe_right_after_a_modify_sees_it() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    apply_catalogue(&gateway, &tokens.admin).await?;
    let (_, creds) = gateway.account_with_key(&tokens.admin, "reader").await?;
    let (other, _) = gateway.account_with_key(&tokens.admin, "other").await?;
    let mut aws = Driver::start(&gateway, &creds, "reader")?;
    aws.upload_image_object("images/consistent.img")?;
    let image = aws.ok(
        "register_image",
        json!({"Name": "consistent", "ImageLocation": "images/consistent.img"}),
    )?;
    let image_id = image["ImageId"].as_str().context("no ImageId")?.to_string();
    for round in 0..30 {
        let (op, want) = if round % 2 == 0 {
            ("Add", 1)
        } else {
            ("Remove", 0)
        };
        aws.ok(
            "modify_image_attribute",
            json!({"ImageId": image_id, "LaunchPermission": {op: [{"UserId": other}]}}),
        )?;
        let seen = aws.ok(
            "describe_image_attribute",
            json!({"ImageId": image_id, "Attribute": "launchPermission"}),
        )?;
        let n = seen["LaunchPermissions"].as_array().map_or(0, Vec::len);
        ensure!(
            n == want,
            "round {round}: after {op} the launch permissions are {}",
            seen["LaunchPermissions"]
        );
    }
    Ok(())
}
