//! Writes every Karri CRD as YAML into `charts/karri/crds` (or the directory given as the first
//! argument) and removes stale `*.karri.dev.yaml` files there.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/karri/crds"),
    };
    std::fs::create_dir_all(&out_dir)?;
    let mut written = BTreeSet::new();
    for (info, crd) in crds::kinds() {
        let name = crds::crd_file_name(&info);
        std::fs::write(out_dir.join(&name), crds::crd_yaml(&crd)?)?;
        println!("wrote {}", out_dir.join(&name).display());
        written.insert(name);
    }
    let suffix = format!(".{}.yaml", crds::GROUP);
    for entry in std::fs::read_dir(&out_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(&suffix) && !written.contains(&name) {
            std::fs::remove_file(out_dir.join(&name))?;
            println!("removed stale {}", out_dir.join(&name).display());
        }
    }
    Ok(())
}
