//! Every manifest under `config/samples` must be a valid Karri record.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context as _};
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde_json::Value;

fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/samples")
}

/// Every non-empty YAML document of `text`, as JSON.
fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Deserializes `value` into the typed root `K` and checks nothing was lost on the way back.
fn typed_round_trip<K>(value: &Value) -> anyhow::Result<()>
where
    K: DeserializeOwned + serde::Serialize,
{
    let typed: K = serde_json::from_value(value.clone())?;
    let back = serde_json::to_value(&typed)?;
    if let (Some(Value::Object(input)), Some(Value::Object(output))) =
        (value.get("spec"), back.get("spec"))
    {
        for key in input.keys() {
            ensure!(
                output.contains_key(key),
                "spec.{key} was dropped by the type"
            );
        }
    }
    Ok(())
}

#[test]
fn every_sample_manifest_parses_and_validates() -> anyhow::Result<()> {
    let dir = samples_dir();
    let mut kinds_seen = std::collections::BTreeSet::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    ensure!(!paths.is_empty(), "no samples in {}", dir.display());
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let docs = documents(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(!docs.is_empty(), "{} holds no document", path.display());
        for (i, doc) in docs.iter().enumerate() {
            let at = format!("{} document {}", path.display(), i + 1);
            ensure!(
                doc["apiVersion"] == crds::API_VERSION,
                "{at}: apiVersion must be {}",
                crds::API_VERSION
            );
            let kind = doc["kind"]
                .as_str()
                .with_context(|| format!("{at}: no kind"))?;
            let info =
                crds::kind_by_kind(kind).with_context(|| format!("{at}: unknown kind {kind}"))?;
            ensure!(
                doc["metadata"]["name"]
                    .as_str()
                    .is_some_and(crds::is_valid_record_name),
                "{at}: metadata.name must be a valid record name"
            );
            ensure!(
                doc["metadata"].get("namespace").is_none(),
                "{at}: samples carry no namespace (namespaced ones apply to the current namespace)"
            );
            ensure!(
                doc["metadata"]["labels"].get(crds::ID_LABEL).is_none(),
                "{at}: the {} label is allocated by the gateway",
                crds::ID_LABEL
            );
            let typed = match kind {
                "Account" => typed_round_trip::<crds::Account>(doc),
                "AccessKey" => typed_round_trip::<crds::AccessKey>(doc),
                "KeyPair" => typed_round_trip::<crds::KeyPair>(doc),
                "Bucket" => typed_round_trip::<crds::Bucket>(doc),
                "AvailabilityZone" => typed_round_trip::<crds::AvailabilityZone>(doc),
                "Node" => typed_round_trip::<crds::Node>(doc),
                "InstanceType" => typed_round_trip::<crds::InstanceType>(doc),
                "Image" => typed_round_trip::<crds::Image>(doc),
                "Instance" => typed_round_trip::<crds::Instance>(doc),
                "Lease" => typed_round_trip::<crds::Lease>(doc),
                other => bail!("{at}: no typed check for kind {other}"),
            };
            typed.with_context(|| format!("{at}: does not deserialize as {kind}"))?;
            crds::validate_object(kind, doc).with_context(|| format!("{at}: {kind} is invalid"))?;
            kinds_seen.insert(info.kind);
        }
    }
    let missing: Vec<_> = crds::kind_infos()
        .iter()
        .filter(|k| !kinds_seen.contains(k.kind))
        .map(|k| k.kind)
        .collect();
    ensure!(missing.is_empty(), "no sample for {missing:?}");
    Ok(())
}
