//! The secrets key that seals access keys at rest: a gateway whose key file is missing or is
//! another key refuses to start (saying why) rather than start with a fresh key on which every
//! stored access key fails; with the right key back, the keys work again.

use anyhow::ensure;
use karri_testkit::{Etcd, Gateway, Tokens};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_the_key_that_sealed_the_access_keys_refuses_to_start(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let mut gw = Gateway::start(&etcd.endpoint, &tokens).await?;
    let (_, creds) = gw.account_with_key(&tokens.admin, "sealed").await?;
    gw.aws(&creds, &["ec2", "describe-regions"]).await?;
    let key_file = gw.dir().join("pki/secrets.key");
    let original = std::fs::read(&key_file)?;

    // Another key: the gateway does not start.
    std::fs::write(&key_file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n")?;
    let refused = gw.restart().await;
    ensure!(refused.is_err(), "the gateway started with another key");
    let log = std::fs::read_to_string(gw.log_path())?;
    ensure!(
        log.contains("does not open the stored access key"),
        "the gateway did not say why:\n{log}"
    );

    // No key file: the gateway does not start, and makes no new key.
    std::fs::remove_file(&key_file)?;
    ensure!(
        gw.restart().await.is_err(),
        "the gateway started without its key"
    );
    let log = std::fs::read_to_string(gw.log_path())?;
    ensure!(
        log.contains("does not exist, but access keys sealed with a key are stored"),
        "the gateway did not say why:\n{log}"
    );
    ensure!(!key_file.exists(), "the gateway made a new key");

    // The right key back: the stored access key works again.
    std::fs::write(&key_file, &original)?;
    gw.restart().await?;
    gw.aws(&creds, &["ec2", "describe-regions"]).await?;
    Ok(())
}
