//! The static kind table agrees with the generated CRDs.

use crds::KindInfo;

#[test]
fn kind_table_matches_the_generated_crds() {
    let kinds = crds::kinds();
    assert_eq!(kinds.len(), crds::kind_infos().len());
    for ((info, crd), listed) in kinds.iter().zip(crds::kind_infos()) {
        assert_eq!(info, listed);
        let names = &crd.spec.names;
        assert_eq!(crd.spec.group, crds::GROUP);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{}.{}", info.plural, crds::GROUP).as_str())
        );
        assert_eq!(names.kind, info.kind);
        assert_eq!(names.plural, info.plural);
        assert_eq!(names.singular.as_deref(), Some(info.singular));
        let short: Vec<&str> = names
            .short_names
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert_eq!(short, info.short_names, "{}", info.kind);
        assert_eq!(
            names.categories,
            Some(vec![crds::CATEGORY.to_owned()]),
            "{}",
            info.kind
        );
        let scope = if info.namespaced {
            "Namespaced"
        } else {
            "Cluster"
        };
        assert_eq!(crd.spec.scope, scope, "{}", info.kind);
        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, crds::VERSION);
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            "{} has a status subresource",
            info.kind
        );
    }
}

#[test]
fn every_kind_shows_its_id_first_and_age_last() {
    for (info, crd) in crds::kinds() {
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let first = columns.first().expect("columns");
        assert_eq!(
            (first.name.as_str(), first.json_path.as_str()),
            ("ID", r".metadata.labels.karri\.dev/id"),
            "{}",
            info.kind
        );
        let last = columns.last().expect("columns");
        assert_eq!(
            (last.name.as_str(), last.type_.as_str()),
            ("Age", "date"),
            "{}",
            info.kind
        );
    }
}

#[test]
fn instances_are_selectable_by_node_name() {
    let (_, crd) = crds::kinds()
        .into_iter()
        .find(|(info, _)| info.kind == "Instance")
        .expect("Instance kind");
    let fields: Vec<String> = crd.spec.versions[0]
        .selectable_fields
        .iter()
        .flatten()
        .map(|f| f.json_path.clone())
        .collect();
    assert_eq!(fields, vec![format!(".{}", crds::NODE_NAME_FIELD)]);
}

#[test]
fn kinds_resolve_by_plural_singular_kind_or_short_name() {
    let rows: [(&str, Option<&str>); 10] = [
        ("instances", Some("Instance")),
        ("instance", Some("Instance")),
        ("Instance", Some("Instance")),
        ("inst", Some("Instance")),
        ("INSTANCES", Some("Instance")),
        ("az", Some("AvailabilityZone")),
        ("instancetypes", Some("InstanceType")),
        ("bkt", Some("Bucket")),
        ("emi", None),
        ("pods", None),
    ];
    for (name, kind) in rows {
        assert_eq!(
            crds::resolve(name).map(|k| k.kind),
            kind,
            "resolve({name:?})"
        );
    }
}

#[test]
fn kind_by_plural_matches_only_plurals() {
    assert_eq!(
        crds::kind_by_plural("images").map(|k| k.kind),
        Some("Image")
    );
    assert_eq!(crds::kind_by_plural("image").map(|k| k.kind), None);
    assert_eq!(crds::kind_by_plural("img").map(|k| k.kind), None);
}

#[test]
fn id_prefixes_are_distinct_and_ids_check_against_them() {
    let prefixes: std::collections::BTreeSet<_> =
        crds::kind_infos().iter().map(|k| k.id_prefix).collect();
    assert_eq!(prefixes.len(), crds::kind_infos().len());
    let instance: KindInfo = crds::kind_by_kind("Instance").expect("Instance");
    assert!(instance.is_valid_id("i-0123456789abcdef0"));
    assert!(!instance.is_valid_id("emi-0123456789abcdef0"));
    let image = crds::kind_by_kind("Image").expect("Image");
    assert!(image.is_valid_id("emi-0123456789abcdef0"));
}
