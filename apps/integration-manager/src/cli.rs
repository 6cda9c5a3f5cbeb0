//! Subcommands: `serve` (default), `token`, `migrate`, `openapi`, `probe`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use im_domain::{Role, TenantId, UserId};

use crate::config::Settings;
use crate::startup::{Application, ServeRole, local_jwt, open_storage};

#[derive(Debug, Parser)]
#[command(name = "integration-manager", version, about = "Connect tenants' third-party tools: integrations, catalog, webhooks, sync")]
pub struct Cli {
    /// TOML configuration file (overrides the defaults; IM_* environment variables override it).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API and run the background workers (the default).
    Serve {
        /// `api`: HTTP only; `worker`: outbox relay, delivery dispatcher and sweeper, with only the
        /// health endpoints on the port; `all`: both.
        #[arg(long, value_enum, default_value_t = ServeRole::All)]
        role: ServeRole,
    },
    /// Print a token for a tenant, user and roles, signed with the server's key.
    Token {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        /// Comma-separated: viewer, member, admin.
        #[arg(long, default_value = "member", value_delimiter = ',')]
        roles: Vec<String>,
        /// Lifetime in seconds (default: auth.token_ttl).
        #[arg(long)]
        ttl: Option<i64>,
    },
    /// Prepare the configured store (idempotent).
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
    /// Exit 0 when the server configured on this machine answers its liveness check (a
    /// container health check for images without a shell or curl).
    Probe,
}

fn settings(cli: &Cli) -> Result<Settings, ExitCode> {
    Settings::load(cli.config.as_deref()).map_err(|e| {
        eprintln!("configuration error: {e}");
        ExitCode::from(2)
    })
}

fn fail(context: &str, e: &anyhow::Error) -> ExitCode {
    tracing::error!(error = format!("{e:#}"), "{context}");
    eprintln!("{context}: {e:#}");
    ExitCode::FAILURE
}

/// Runs the command line; returns the process exit code.
#[allow(clippy::print_stdout)]
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Openapi) => {
            print!("{}", crate::api::openapi::document());
            ExitCode::SUCCESS
        }
        Some(Command::Token { ref tenant, ref user, ref roles, ttl }) => {
            let settings = match settings(&cli) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let (tenant, user) = match (TenantId::new(tenant.as_str()), UserId::new(user.as_str())) {
                (Ok(t), Ok(u)) => (t, u),
                (Err(e), _) => return usage(&format!("--tenant: {}", e.message)),
                (_, Err(e)) => return usage(&format!("--user: {}", e.message)),
            };
            let mut parsed = Vec::new();
            for role in roles {
                match Role::parse(role.trim()) {
                    Some(r) => parsed.push(r),
                    None => return usage(&format!("--roles: unknown role '{role}' (viewer, member, admin)")),
                }
            }
            let ttl = ttl.unwrap_or_else(|| i64::try_from(settings.auth.token_ttl.get().as_secs()).unwrap_or(i64::MAX));
            match local_jwt(&settings).and_then(|jwt| jwt.mint(&tenant, &user, &parsed, ttl)) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail("cannot mint a token", &e),
            }
        }
        Some(Command::Migrate) => {
            let settings = match settings(&cli) {
                Ok(s) => s,
                Err(code) => return code,
            };
            crate::telemetry::init(&settings.log);
            match open_storage(&settings, std::sync::Arc::new(im_domain::SystemClock), true).await {
                Ok(storage) => {
                    for line in &storage.report {
                        println!("{line}");
                    }
                    println!("store ready");
                    ExitCode::SUCCESS
                }
                Err(e) => fail("migration failed", &e),
            }
        }
        Some(Command::Probe) => {
            let settings = match settings(&cli) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match crate::startup::probe(settings.server.port, std::time::Duration::from_secs(3)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("not live: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None | Some(Command::Serve { .. }) => {
            let role = match cli.command {
                Some(Command::Serve { role }) => role,
                _ => ServeRole::All,
            };
            let settings = match settings(&cli) {
                Ok(s) => s,
                Err(code) => return code,
            };
            crate::telemetry::init(&settings.log);
            let app = match Application::build_with_role(settings, role).await {
                Ok(app) => app,
                Err(e) => return fail("cannot start", &e),
            };
            match app.run_until_stopped().await {
                Ok(()) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => fail("server failed", &e.into()),
            }
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(2)
}
