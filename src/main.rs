//! `session-broker`: parses the command line and hands over to the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use session_broker::{
    api_keys,
    config::{Settings, Sources},
    startup::Application,
    store::{CredentialKind, redis::RedisStore},
    telemetry,
};

/// See Cargo.toml: the allocator is a measurable share of a session's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Authorizes WebSocket sessions to Pipecat bots and relays them")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no command: `serve` with these arguments.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve(ServeArgs),
    /// Run a WebSocket bot that echoes every message back.
    EchoBot {
        #[arg(long, default_value = "127.0.0.1:7860")]
        listen: SocketAddr,
    },
    /// Print the hash of a public API key, as `orgs.<org>.public_key_hashes` wants it.
    HashKey { key: String },
    /// Print a fresh random token signing key.
    GenKey,
    /// Exit 0 when the broker at URL answers 200 (for container health checks: the runtime
    /// image has no curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// Create or update an agent in the shared registry (Redis) from its pcc-deploy.toml.
    Deploy {
        file: PathBuf,
        #[arg(long)]
        org: String,
        /// Where the agent's bots listen: `ws://…` for every region, `region=ws://…` for one
        /// (repeat it). Without it, the settings' `[bots]` templates apply.
        #[arg(long = "bot-url")]
        bot_urls: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Manage an org's public API keys (`pk_…`, for /start) in the shared registry (Redis).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage an org's private tokens (`pcc_pat_…`, for the private API the `pipecat cloud`
    /// CLI calls) in the shared registry (Redis).
    Tokens {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create one; it is shown once and stored only as its hash.
    Create {
        #[arg(long)]
        org: String,
        /// A name to tell it by in lists.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List an org's (ids, names and dates, never the secrets).
    List {
        #[arg(long)]
        org: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke one by its id; every replica refuses it within registry.refresh_ms.
    Revoke {
        id: String,
        #[arg(long)]
        org: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the shared registry is: the same settings as `serve` reads.
#[derive(clap::Args)]
struct StoreArgs {
    /// Settings file (TOML). Environment variables `BROKER__…` override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redis URL, when not in the settings.
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Settings file (TOML). Environment variables `BROKER__…` override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Address of the internal listener: metrics and probes [default: 127.0.0.1:9090].
    #[arg(long)]
    internal_listen: Option<String>,
    /// Redis URL; without one the broker runs on its embedded in-memory store.
    #[arg(long)]
    redis_url: Option<String>,
    /// Serve the built-in demo agent `echo` with the public key `pk_demo` (embedded store and
    /// a loopback address only).
    #[arg(long)]
    demo: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(args) => serve(args),
        Command::EchoBot { listen } => run(async move {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("echo bot listening on ws://{}", listener.local_addr()?);
            session_broker::echo_bot::serve(listener).await;
            Ok(())
        }),
        Command::HashKey { key } => {
            println!("sha256:{}", hex::encode(api_keys::hash_api_key(&key)));
            ExitCode::SUCCESS
        }
        Command::Deploy { file, org, bot_urls, store } => admin(store, async move |s, settings| {
            let defaults = settings.bots.defaults();
            let (service, version) =
                session_broker::admin::deploy(s, &org, &file, &bot_urls, &defaults).await?;
            println!("deployed {service} (registry version {version})");
            Ok(())
        }),
        Command::Keys { command } => credentials(CredentialKind::ApiKey, command),
        Command::Tokens { command } => credentials(CredentialKind::PrivateToken, command),
        Command::Healthcheck { url } => match healthcheck(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("session-broker: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::GenKey => {
            use base64::Engine;
            use rand::RngCore;
            let mut bytes = [0u8; 48];
            rand::rng().fill_bytes(&mut bytes);
            println!("{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
            ExitCode::SUCCESS
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut overrides = Vec::new();
    if let Some(listen) = args.listen {
        overrides.push(("listen".to_owned(), listen));
    }
    if let Some(internal) = args.internal_listen {
        overrides.push(("internal_listen".to_owned(), internal));
    }
    if args.demo {
        overrides.push(("demo".to_owned(), "true".to_owned()));
    }
    if let Some(url) = args.redis_url {
        overrides.push(("redis.url".to_owned(), url));
    }
    let settings = match Settings::load(Sources { file: args.config, env: None, overrides }) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("session-broker: {e}");
            return ExitCode::from(2);
        }
    };
    let _log = telemetry::init(&settings.log);
    run(async move {
        let app = Application::build(settings).await?;
        app.run_until_signalled().await
    })
}

/// One plain HTTP/1.1 GET with a short timeout; healthy on status 200.
fn healthcheck(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
    let url = url::Url::parse(url)?;
    let addr = url
        .socket_addrs(|| Some(80))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("{url} resolves to no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let host = url.host_str().unwrap_or("localhost");
    write!(stream, "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n", url.path())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    match &head[9..12] {
        b"200" => Ok(()),
        status => anyhow::bail!("status {}", String::from_utf8_lossy(status)),
    }
}

/// `keys` and `tokens`: the same commands on public keys and on private tokens.
fn credentials(kind: CredentialKind, command: KeysCommand) -> ExitCode {
    use session_broker::admin;
    let what = match kind {
        CredentialKind::ApiKey => "key",
        CredentialKind::PrivateToken => "token",
    };
    match command {
        KeysCommand::Create { org, name, store } => admin(store, async move |s, _| {
            let (secret, record) = admin::create_credential(s, kind, &org, name.as_deref()).await?;
            println!("{secret}");
            eprintln!(
                "{what} {} created for {org}; it is shown this once and stored only as a hash",
                record.id
            );
            Ok(())
        }),
        KeysCommand::List { org, store } => admin(store, async move |s, _| {
            for record in admin::list_credentials(s, kind, &org).await? {
                let state = match record.revoked_ms {
                    Some(at) => format!("revoked at {at}"),
                    None => "active".to_owned(),
                };
                let name = record.name.as_deref().unwrap_or("-");
                println!("{}\t{name}\tcreated at {}\t{state}", record.id, record.created_ms);
            }
            Ok(())
        }),
        KeysCommand::Revoke { id, org, store } => admin(store, async move |s, _| {
            match admin::revoke_credential(s, kind, &org, &id).await? {
                Some(record) => println!("{what} {} of {org} revoked", record.id),
                None => anyhow::bail!("org {org} has no {what} {id}"),
            }
            Ok(())
        }),
    }
}

/// Runs an operator command against the configured Redis.
fn admin(
    args: StoreArgs,
    work: impl AsyncFnOnce(&dyn session_broker::store::RegistryStore, &Settings) -> anyhow::Result<()>,
) -> ExitCode {
    let mut overrides = Vec::new();
    if let Some(url) = args.redis_url {
        overrides.push(("redis.url".to_owned(), url));
    }
    let settings = match Settings::load(Sources { file: args.config, env: None, overrides }) {
        Ok(settings) if settings.redis.is_configured() => settings,
        Ok(_) => {
            eprintln!(
                "session-broker: the shared registry lives in Redis: set redis.url (or --redis-url)"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("session-broker: {e}");
            return ExitCode::from(2);
        }
    };
    run(async move {
        let store = RedisStore::new(&settings.redis)?;
        work(&store, &settings).await
    })
}

fn run(work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("session-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("session-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
