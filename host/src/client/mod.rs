//! The command-line client: `conductor image|provider|account …` speaking the XML API
//! of a server (this one or any Conductor-compatible one) over HTTP.
//!
//! Answers are asked for as JSON (the server renders the same fields as its XML) and shown
//! as a table, or printed as they come with `--output json` or `--output xml`. A refused
//! request prints the server's code and message and exits non-zero. `--wait` follows
//! builds and pushes with a progress bar per target or provider image until each ends.

mod images;
mod providers;

pub use images::image;
pub use providers::{account, provider};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Where the server is and who asks: flags, then environment, then the config file.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The server's URL (with `/conductor` if it is mounted there).
    #[arg(long, global = true, env = "CONDUCTOR_URL")]
    pub server: Option<String>,
    /// User name.
    #[arg(long, global = true, env = "CONDUCTOR_USER")]
    pub user: Option<String>,
    /// Password.
    #[arg(
        long,
        global = true,
        env = "CONDUCTOR_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// A TOML file with `server`, `user` and `password` (any of them); default
    /// `$HOME/.config/conductor/client.toml` when it exists.
    #[arg(long = "client-config", global = true, env = "CONDUCTOR_CLIENT_CONFIG")]
    pub client_config: Option<PathBuf>,
    /// How to print answers.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Xml,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build an image from a TDL template for one or more targets.
    Build {
        /// The TDL template file.
        #[arg(long)]
        template: PathBuf,
        /// Targets, comma-separated (`ec2,mock`).
        #[arg(long)]
        targets: String,
        #[arg(long, default_value = "default")]
        environment: String,
        /// A base disk image to start from (file:// inside the server's import directory,
        /// or http(s)://).
        #[arg(long)]
        base_image: Option<String>,
        /// A parameter for the plugins, NAME=VALUE; repeatable.
        #[arg(long = "param", value_parser = pair)]
        parameters: Vec<(String, String)>,
        /// Follow the build until every target image has finished.
        #[arg(long)]
        wait: bool,
    },
    /// Push an image's target images (or one build's, or one target image) to accounts.
    Push {
        /// The image, build or target image id.
        id: String,
        /// What the id names.
        #[arg(long, value_enum, default_value_t = PushOf::Image)]
        of: PushOf,
        /// Provider accounts, comma-separated labels.
        #[arg(long)]
        accounts: String,
        /// A parameter for the plugins' push, NAME=VALUE; repeatable.
        #[arg(long = "param", value_parser = pair)]
        parameters: Vec<(String, String)>,
        /// Follow the pushes until each has finished.
        #[arg(long)]
        wait: bool,
    },
    /// Print a target image's build log; with --follow, go on printing it as the build
    /// runs, until it ends.
    Log {
        /// The target image id.
        id: String,
        #[arg(long)]
        follow: bool,
    },
    /// List images.
    List,
    /// Show an image.
    Show { id: String },
    /// Show the status of an image's target and provider images.
    Status { id: String },
    /// Delete an image, its builds, and its provider images on the providers.
    Delete { id: String },
    /// Compare the packages of two target images (from their SBOMs): what only one
    /// holds (`-`, `+`), and what both hold in other versions (`~`). `--output json`
    /// (or xml) prints the differences as a JSON list.
    Diff {
        /// The first target image id.
        a: String,
        /// The second target image id.
        b: String,
    },
    /// Register an image that already exists on a provider.
    Import {
        /// The provider's identifier of the image (an AMI id, a Glance id).
        #[arg(long)]
        identifier: String,
        /// The provider account it is in.
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "default")]
        environment: String,
        /// A name for it (the identifier when absent).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOf {
    Image,
    Build,
    TargetImage,
}

#[derive(Subcommand, Debug)]
pub enum ProviderCommand {
    /// List providers.
    List,
    /// Show a provider and its settings.
    Show { id: String },
    /// List the provider types the server's plugins bring.
    Types,
    /// Show a provider type: its settings, and the credentials its accounts take.
    Type {
        /// The type's id (a target: `ec2`, `openstack`, `mock`).
        id: String,
    },
    /// Create a provider of a provider type.
    Create {
        #[arg(long)]
        name: String,
        /// The provider type (a target: `ec2`, `openstack`, `mock`).
        #[arg(long = "type")]
        kind: String,
        /// A setting, NAME=VALUE; repeatable.
        #[arg(long = "setting", value_parser = pair)]
        settings: Vec<(String, String)>,
    },
    /// Delete a provider and its accounts; refused while images pushed through it exist.
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// List provider accounts.
    List,
    /// Show a provider account.
    Show { id: String },
    /// Create an account on a provider; the server checks its credentials first.
    Create {
        /// The provider's id.
        #[arg(long)]
        provider: String,
        #[arg(long)]
        label: String,
        /// A credential, NAME=VALUE (the names `conductor provider type TYPE` lists);
        /// repeatable.
        #[arg(long = "credential", value_parser = pair)]
        credentials: Vec<(String, String)>,
        /// Add the account to this environment (by id).
        #[arg(long)]
        environment: Option<String>,
    },
    /// Delete a provider account; refused while images pushed with it exist.
    Delete { id: String },
}

fn pair(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("'{raw}' is not NAME=VALUE"))
}

/// XML-escapes text for a request body.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn parameters_xml(parameters: &[(String, String)]) -> String {
    if parameters.is_empty() {
        return String::new();
    }
    let inner: String = parameters
        .iter()
        .map(|(k, v)| format!("<parameter name='{}'>{}</parameter>", esc(k), esc(v)))
        .collect();
    format!("<parameters>{inner}</parameters>")
}

/// A connection to one server with one user's credentials.
pub struct Client {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
    output: Output,
}

#[derive(serde::Deserialize, Default)]
struct ConfigFile {
    server: Option<String>,
    user: Option<String>,
    password: Option<String>,
}

impl Client {
    pub fn new(connection: &Connection) -> anyhow::Result<Client> {
        let path = connection.client_config.clone().or_else(|| {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".config/conductor/client.toml"))
                .filter(|p| p.exists())
        });
        let file = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<ConfigFile>(&text)
                    .with_context(|| format!("reading {}", path.display()))?
            }
            None => ConfigFile::default(),
        };
        let base = connection
            .server
            .clone()
            .or(file.server)
            .unwrap_or_else(|| "http://127.0.0.1:3000".into());
        let Some(password) = connection.password.clone().or(file.password) else {
            bail!("no password: give --password, CONDUCTOR_PASSWORD or a client config file");
        };
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                // A server closes connections idle for its keep-alive timeout (this
                // one's 5 s by default); reusing one it is closing fails a POST.
                .pool_idle_timeout(Duration::from_secs(2))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            user: connection
                .user
                .clone()
                .or(file.user)
                .unwrap_or_else(|| "admin".into()),
            password,
            output: connection.output,
        })
    }

    /// A target image's build log from byte `offset`: the text, where to read next, and
    /// whether the build has ended (nothing more will come).
    async fn log(&self, target_image: &str, offset: u64) -> anyhow::Result<(String, u64, bool)> {
        let url = format!(
            "{}/api/target_images/{target_image}/log?offset={offset}",
            self.base
        );
        let response = self
            .http
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .with_context(|| format!("could not reach {url}"))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let next = header("x-log-offset").and_then(|v| v.parse::<u64>().ok());
        let complete = header("x-log-complete").as_deref() == Some("true");
        let text = response.text().await?;
        if status >= 400 {
            bail!("{}", error_text(status, &text));
        }
        // Without the offset to go on from, following would print the same part again.
        let Some(next) = next else {
            bail!(
                "the server's answer has no X-Log-Offset header: it does not serve logs in parts"
            );
        };
        Ok((text, next, complete))
    }

    /// Sends a request; answers the status and body, JSON unless `--output xml`.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        json: bool,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}/api{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .basic_auth(&self.user, Some(&self.password))
            .header(
                "Accept",
                if json {
                    "application/json"
                } else {
                    "application/xml"
                },
            );
        if let Some(body) = body {
            request = request.header("Content-Type", "application/xml").body(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("could not reach {url}"))?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        if status == 401 {
            bail!("the server refused the credentials of user '{}'", self.user);
        }
        if status >= 400 {
            bail!("{}", error_text(status, &text));
        }
        Ok((status, text))
    }

    /// A request whose answer is printed as the output format asks, or returned as JSON
    /// for a table.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Option<Value>> {
        let json = self.output != Output::Xml;
        let (_, text) = self.send(method, path, body, json).await?;
        match self.output {
            Output::Xml => {
                println!("{text}");
                Ok(None)
            }
            Output::Json => {
                println!("{}", serde_json::to_string_pretty(&json_answer(&text)?)?);
                Ok(None)
            }
            Output::Table => Ok(Some(json_answer(&text)?)),
        }
    }

    /// An answer as JSON, whether it came as JSON or (for `--output xml`) as XML.
    fn parse(&self, body: &str) -> anyhow::Result<Value> {
        match self.output {
            Output::Xml => crate::api::json::from_xml(body.as_bytes()).map_err(anyhow::Error::from),
            _ => Ok(serde_json::from_str(body)?),
        }
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (_, text) = self.send(reqwest::Method::GET, path, None, true).await?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// An answer's JSON: an empty body is null, anything else must be JSON (a proxy's HTML
/// page is reported, not shown as an empty table).
fn json_answer(text: &str) -> anyhow::Result<Value> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).with_context(|| {
        let start: String = text.chars().take(200).collect();
        format!("the server's answer is not JSON: {start}")
    })
}

/// The server's code and message from an error answer, in JSON or XML, or the status.
fn error_text(status: u16, body: &str) -> String {
    if let Ok(value) = serde_json::from_str::<Value>(body) {
        if let Some(error) = value.get("error") {
            return format!("{}: {}", text(&error["code"]), text(&error["message"]));
        }
        if let Some(errors) = value.get("errors") {
            let messages: Vec<String> = list(errors).iter().map(|e| text(&e["message"])).collect();
            return format!("refused ({status}): {}", messages.join("; "));
        }
    }
    if body.trim().is_empty() {
        format!("the server answered {status}")
    } else {
        format!("the server answered {status}: {}", body.trim())
    }
}

/// A JSON string, or the text of an object with text, or empty.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("text").map(text).unwrap_or_default(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// The items of a value that may be a list or a single item.
fn list(value: &Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items.clone(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

/// The only value of a one-key object (the document's root).
fn root(value: &Value) -> &Value {
    match value {
        Value::Object(map) if map.len() == 1 => map.values().next().unwrap_or(value),
        _ => value,
    }
}

/// Every id of a resource kind linked from a document, in order, once each.
fn linked_ids(value: &Value, kind: &str, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let (Some(Value::String(href)), Some(Value::String(id))) =
                (map.get("href"), map.get("id"))
                && href.contains(&format!("/api/{kind}/"))
                && !into.contains(id)
            {
                into.push(id.clone());
            }
            for child in map.values() {
                linked_ids(child, kind, into);
            }
        }
        Value::Array(items) => {
            for item in items {
                linked_ids(item, kind, into);
            }
        }
        _ => {}
    }
}

/// Prints rows under a header, each column as wide as its widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// A table of a list document: the named fields of each item.
fn list_table(value: &Value, fields: &[&str]) {
    let rows: Vec<Vec<String>> = list(root(value))
        .iter()
        .map(|item| fields.iter().map(|f| text(&item[*f])).collect())
        .collect();
    table(fields, &rows);
}

/// A two-column table of a document's simple fields.
fn show_table(value: &Value) {
    let item = root(value);
    let mut rows = Vec::new();
    if let Value::Object(map) = item {
        for (key, field) in map {
            let shown = match field {
                Value::Array(items) => format!("{} item(s)", items.len()),
                Value::Object(_) if !text(field).is_empty() => text(field),
                Value::Object(inner) => inner
                    .iter()
                    .filter(|(_, v)| v.is_string() && !text(v).is_empty())
                    .map(|(k, v)| format!("{k}={}", text(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => text(other),
            };
            rows.push(vec![key.clone(), shown]);
        }
    }
    table(&["field", "value"], &rows);
}
