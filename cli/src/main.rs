//! `karri`: the administrator's command. It creates accounts and access keys through the
//! gateway's resource API with an admin kubeconfig, and prints the new credentials once; it
//! uploads disk images into S3 or the image store and registers them (`karri image register`).

mod image;
mod interrupt;
mod s3;
mod store;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use crds::{AccessKey, AccessKeySpec, Account, AccountSpec};
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// Command-line interface.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Karri administration: accounts, access keys and images"
)]
struct Cli {
    /// Admin kubeconfig for the gateway (as `make up` writes it).
    #[arg(long, env = "KUBECONFIG", global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Accounts (tenants).
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Access keys that AWS clients sign with.
    AccessKey {
        #[command(subcommand)]
        command: AccessKeyCommand,
    },
    /// Disk images (EMI, EKI, ERI): upload and register, list.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Create an account; prints its 12-digit account ID and namespace.
    Create {
        /// Account name (a lowercase DNS name; also its namespace).
        name: String,
        /// Human-friendly name.
        #[arg(long)]
        display_name: Option<String>,
        /// Contact email.
        #[arg(long)]
        email: Option<String>,
        /// Succeed without change when the account already exists.
        #[arg(long)]
        if_missing: bool,
    },
    /// List accounts.
    List,
}

#[derive(Subcommand, Debug)]
enum AccessKeyCommand {
    /// Create an access key for an account and print it; the secret is shown only now.
    Create {
        /// Account the key signs for.
        #[arg(long)]
        account: String,
        /// User name recorded with the key.
        #[arg(long, default_value = "admin")]
        user: String,
        /// Print shell `export` lines (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
        #[arg(long)]
        env: bool,
    },
    /// List access keys (never their secrets).
    List,
}

async fn client(path: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match path {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig: pass --kubeconfig or set KUBECONFIG (see karri.env)")?,
    };
    Ok(Client::try_from(admin_settings(config))?)
}

/// How long the gateway may take to answer one admin request.
const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The client settings of a one-shot admin command: an answer within [`API_TIMEOUT`] of the
/// request, and no automatic retries (kube retries every method on 429, 503 and 504, and a
/// create retried after it committed would make a second access key whose secret nobody saw).
fn admin_settings(mut config: Config) -> Config {
    config.read_timeout = Some(API_TIMEOUT);
    config.reset_reader_on_write = true;
    config.default_retry = false;
    // Its writes are recorded under this name in records' managedFields.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("karri/", env!("CARGO_PKG_VERSION"))),
    ));
    config
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = client(cli.kubeconfig.as_ref()).await?;
    let done = match cli.command {
        Command::Account { command } => account(client, command).await,
        Command::AccessKey { command } => access_key(client, command).await,
        // Only image commands copy and upload for long: they stop cleanly on a signal; the
        // others end at once, as a signal ends any program.
        Command::Image { command } => {
            interrupt::install();
            image::run(client, command).await
        }
    };
    if done.is_err() && interrupt::interrupted() {
        let _ = writeln!(std::io::stderr(), "interrupted");
        std::process::exit(interrupt::exit_status());
    }
    done
}

async fn account(client: Client, command: AccountCommand) -> anyhow::Result<()> {
    let api: Api<Account> = Api::all(client);
    match command {
        AccountCommand::Create {
            name,
            display_name,
            email,
            if_missing,
        } => {
            let existing = api.get_opt(&name).await?;
            let account = match existing {
                Some(a) if if_missing => a,
                Some(_) => bail!("account {name} already exists"),
                None => {
                    let mut a = Account::new(
                        &name,
                        AccountSpec {
                            display_name,
                            email,
                        },
                    );
                    a.metadata.name = Some(name.clone());
                    api.create(&PostParams::default(), &a)
                        .await
                        .with_context(|| format!("cannot create account {name}"))?
                }
            };
            let status = account.status.unwrap_or_default();
            println!(
                "account {name}: id {} namespace {}",
                status.account_id.unwrap_or_default(),
                status.namespace.unwrap_or_default()
            );
        }
        AccountCommand::List => {
            println!("{:<24} {:<14} NAMESPACE", "NAME", "ACCOUNT ID");
            for a in api.list(&ListParams::default()).await? {
                let status = a.status.unwrap_or_default();
                println!(
                    "{:<24} {:<14} {}",
                    a.metadata.name.unwrap_or_default(),
                    status.account_id.unwrap_or_default(),
                    status.namespace.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

async fn access_key(client: Client, command: AccessKeyCommand) -> anyhow::Result<()> {
    let api: Api<AccessKey> = Api::all(client.clone());
    match command {
        AccessKeyCommand::Create { account, user, env } => {
            let accounts: Api<Account> = Api::all(client);
            if accounts.get_opt(&account).await?.is_none() {
                bail!("there is no account {account}: create it with `karri account create {account}`");
            }
            let mut key = AccessKey::new(
                "",
                AccessKeySpec {
                    account_name: account.clone(),
                    user_name: Some(user.clone()),
                    active: true,
                    description: None,
                },
            );
            key.metadata.name = None;
            key.metadata.generate_name = Some(format!("{account}-"));
            let made = api
                .create(&PostParams::default(), &key)
                .await
                .with_context(|| format!("cannot create an access key for {account}"))?;
            let status = made.status.unwrap_or_default();
            let (Some(id), Some(secret)) = (status.access_key_id, status.secret_access_key) else {
                bail!("the gateway returned no credentials");
            };
            if env {
                println!("export AWS_ACCESS_KEY_ID={id}");
                println!("export AWS_SECRET_ACCESS_KEY={secret}");
            } else {
                println!("AccessKeyId:     {id}");
                println!("SecretAccessKey: {secret}");
                println!("(the secret is shown only now; store it safely)");
            }
        }
        AccessKeyCommand::List => {
            println!(
                "{:<32} {:<22} {:<20} ACTIVE",
                "NAME", "ACCESS KEY ID", "ACCOUNT"
            );
            for k in api.list(&ListParams::default()).await? {
                let status = k.status.unwrap_or_default();
                println!(
                    "{:<32} {:<22} {:<20} {}",
                    k.metadata.name.unwrap_or_default(),
                    status.access_key_id.unwrap_or_default(),
                    k.spec.account_name,
                    k.spec.active
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A gateway stand-in that answers every request 503 and counts them.
    async fn unavailable_gateway() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback has a free port");
        let addr = listener.local_addr().expect("bound");
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    // One read holds the small request whole; then the answer closes it.
                    if socket.read(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"ServiceUnavailable","code":503,"message":"etcd is unavailable"}"#;
                    let answer = format!(
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}"), requests)
    }

    #[tokio::test]
    async fn a_create_the_gateway_refuses_as_unavailable_is_sent_once_and_fails_at_once() {
        let (url, requests) = unavailable_gateway().await;
        let config = admin_settings(Config::new(url.parse().expect("a URL")));
        let client = Client::try_from(config).expect("a client");
        let api: Api<AccessKey> = Api::all(client);
        let key = AccessKey::new(
            "ak-test",
            AccessKeySpec {
                account_name: "acme".into(),
                user_name: None,
                active: true,
                description: None,
            },
        );
        let created = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            api.create(&PostParams::default(), &key),
        )
        .await
        .expect("answered without retrying for minutes");
        assert!(created.is_err(), "{created:?}");
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "the create was sent once"
        );
    }
}
