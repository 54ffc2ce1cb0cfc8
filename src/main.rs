//! `session-broker`: parses the command line and hands over to the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use session_broker::{
    config::{Settings, Sources},
    keys,
    startup::Application,
    telemetry,
};

#[derive(Parser)]
#[command(version, about = "Authorizes WebSocket sessions to Pipecat bots and relays them")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Settings file (TOML). Environment variables `BROKER__…` override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Redis URL; without one the broker runs on its embedded in-memory store.
    #[arg(long)]
    redis_url: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::EchoBot { listen } => run(async move {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("echo bot listening on ws://{}", listener.local_addr()?);
            session_broker::echo_bot::serve(listener).await;
            Ok(())
        }),
        Command::HashKey { key } => {
            println!("sha256:{}", hex::encode(keys::hash_key(&key)));
            ExitCode::SUCCESS
        }
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
    telemetry::init(&settings.log);
    run(async move {
        let app = Application::build(settings).await?;
        app.run_until_stopped().await?;
        Ok(())
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
