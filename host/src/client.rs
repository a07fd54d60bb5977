//! The command-line client: `conductor image|provider|account …` speaking the XML API
//! of a server (this one or any Conductor-compatible one) over HTTP.
//!
//! Answers are asked for as JSON (the server renders the same fields as its XML) and shown
//! as a table, or printed as they come with `--output json` or `--output xml`. A refused
//! request prints the server's code and message and exits non-zero. `--wait` follows
//! builds and pushes with a progress bar per target or provider image until each ends.

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
        let next = header("x-log-offset").and_then(|v| v.parse().ok());
        let complete = header("x-log-complete").as_deref() == Some("true");
        let text = response.text().await?;
        if status >= 400 {
            bail!("{}", error_text(status, &text));
        }
        Ok((text, next.unwrap_or(offset), complete))
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
                let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                println!("{}", serde_json::to_string_pretty(&value)?);
                Ok(None)
            }
            Output::Table => Ok(Some(serde_json::from_str(&text).unwrap_or(Value::Null))),
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

pub async fn image(connection: &Connection, command: ImageCommand) -> anyhow::Result<()> {
    let client = Client::new(connection)?;
    use reqwest::Method;
    match command {
        ImageCommand::Build {
            template,
            targets,
            environment,
            base_image,
            parameters,
            wait,
        } => {
            let tdl = std::fs::read_to_string(&template)
                .with_context(|| format!("reading {}", template.display()))?;
            // The template goes in as elements; an XML declaration may not.
            let tdl = match tdl.trim_start().strip_prefix("<?xml") {
                Some(rest) => rest.split_once("?>").map_or("", |(_, r)| r).to_owned(),
                None => tdl,
            };
            let base = base_image
                .map(|u| format!("<base_image>{}</base_image>", esc(&u)))
                .unwrap_or_default();
            let body = format!(
                "<image><targets>{}</targets><tdl>{tdl}</tdl><environment>{}</environment>{base}{}</image>",
                esc(&targets),
                esc(&environment),
                parameters_xml(&parameters)
            );
            create(
                &client,
                "/images",
                body,
                ("image", "images"),
                "target_images",
                wait,
            )
            .await?;
        }
        ImageCommand::Push {
            id,
            of,
            accounts,
            parameters,
            wait,
        } => {
            let element = match of {
                PushOf::Image => "image_id",
                PushOf::Build => "build_id",
                PushOf::TargetImage => "target_image_id",
            };
            let body = format!(
                "<provider_image><provider_account>{}</provider_account><{element}>{}</{element}>{}</provider_image>",
                esc(&accounts),
                esc(&id),
                parameters_xml(&parameters)
            );
            create(
                &client,
                "/provider_images",
                body,
                ("provider image", "provider_images"),
                "provider_images",
                wait,
            )
            .await?;
        }
        ImageCommand::Log { id, follow } => {
            use std::io::Write;
            let mut offset = 0;
            loop {
                let (text, next, complete) = client.log(&id, offset).await?;
                print!("{text}");
                std::io::stdout().flush().ok();
                // A chunk may stop short of the end: read on at once.
                if next > offset {
                    offset = next;
                    continue;
                }
                if !follow || complete {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        ImageCommand::List => {
            if let Some(value) = client.call(Method::GET, "/images", None).await? {
                list_table(&value, &["id", "name", "os", "os_version", "arch"]);
            }
        }
        ImageCommand::Show { id } => {
            if let Some(value) = client
                .call(Method::GET, &format!("/images/{id}"), None)
                .await?
            {
                show_table(&value);
            }
        }
        ImageCommand::Status { id } => {
            // image → builds → target images → provider images.
            let image = client.get_json(&format!("/images/{id}")).await?;
            let mut builds = Vec::new();
            linked_ids(&image, "builds", &mut builds);
            let mut targets = Vec::new();
            for build in &builds {
                let listed = client
                    .get_json(&format!("/builds/{build}/target_images"))
                    .await?;
                linked_ids(&listed, "target_images", &mut targets);
            }
            let mut rows = Vec::new();
            let mut documents = Vec::new();
            for ti in &targets {
                let doc = client.get_json(&format!("/target_images/{ti}")).await?;
                rows.push(status_row("target_images", ti, &doc));
                let mut pushed = Vec::new();
                linked_ids(&doc, "provider_images", &mut pushed);
                documents.push(doc);
                for pi in pushed {
                    let doc = client.get_json(&format!("/provider_images/{pi}")).await?;
                    rows.push(status_row("provider_images", &pi, &doc));
                    documents.push(doc);
                }
            }
            match client.output {
                Output::Table => table(
                    &["kind", "id", "where", "status", "percent", "detail"],
                    &rows,
                ),
                _ => println!(
                    "{}",
                    serde_json::to_string_pretty(&Value::Array(documents))?
                ),
            }
        }
        ImageCommand::Delete { id } => {
            if let Some(value) = client
                .call(Method::DELETE, &format!("/images/{id}"), None)
                .await?
            {
                if value.is_null() {
                    println!("deleted image {id}");
                } else {
                    show_table(&value);
                }
            }
        }
        ImageCommand::Import {
            identifier,
            account,
            environment,
            name,
        } => {
            // An import names the image in a descriptor document, as Conductor's did.
            let name = name.unwrap_or_else(|| identifier.clone());
            let descriptor = format!(
                "<image_descriptor>{}</image_descriptor>",
                esc(&format!("<image><name>{}</name></image>", esc(&name)))
            );
            let body = format!(
                "<image><target_identifier>{}</target_identifier><provider_account_name>{}</provider_account_name><environment>{}</environment>{descriptor}</image>",
                esc(&identifier),
                esc(&account),
                esc(&environment)
            );
            if let Some(value) = client.call(Method::POST, "/images", Some(body)).await? {
                show_table(&value);
            }
        }
    }
    Ok(())
}

/// POSTs a build or a push, prints what it made (the records of the kind `made` names,
/// as (word, collection)), and with `wait` follows the records of collection `followed`
/// the answer links to until each has finished.
async fn create(
    client: &Client,
    path: &str,
    body: String,
    made: (&str, &str),
    followed: &str,
    wait: bool,
) -> anyhow::Result<()> {
    let (_, text_body) = client
        .send(
            reqwest::Method::POST,
            path,
            Some(body),
            client.output != Output::Xml,
        )
        .await?;
    let answer = client.parse(&text_body)?;
    let mut ids = Vec::new();
    linked_ids(&answer, made.1, &mut ids);
    report_created(client, &answer, &text_body, made.0, &ids)?;
    if wait {
        let mut following = Vec::new();
        linked_ids(&answer, followed, &mut following);
        follow(client, followed, &following).await?;
    }
    Ok(())
}

/// After a create: the answer as asked, or one line per thing made.
fn report_created(
    client: &Client,
    answer: &Value,
    raw: &str,
    what: &str,
    ids: &[String],
) -> anyhow::Result<()> {
    match client.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Output::Xml => println!("{raw}"),
        Output::Table => {
            for id in ids {
                println!("{what} {id}");
            }
        }
    }
    Ok(())
}

fn status_row(kind: &str, id: &str, document: &Value) -> Vec<String> {
    let record = root(document);
    let place = ["target", "provider_account", "account", "provider"]
        .iter()
        .map(|k| text(&record[*k]))
        .find(|t| !t.is_empty())
        .unwrap_or_default();
    let detail = &record["status_detail"];
    let note = [text(&detail["error"]), text(&detail["activity"])]
        .into_iter()
        .find(|t| !t.is_empty())
        .unwrap_or_default();
    // A table row stays on one line; the whole text is in `image status --output json`.
    let note: String = if note.chars().count() > 72 {
        note.chars().take(71).chain(['…']).collect()
    } else {
        note
    };
    vec![
        kind.replace('_', " ").trim_end_matches('s').to_owned(),
        id.to_owned(),
        place,
        text(&record["status"]),
        text(&record["percent_complete"]),
        note,
    ]
}

/// Follows target or provider images with one progress bar each until all have ended;
/// fails when any failed.
async fn follow(client: &Client, kind: &str, ids: &[String]) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<22} [{bar:30.cyan/blue}] {pos:>3}%  {msg}")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> ");
    let mut tracked: BTreeMap<String, ProgressBar> = BTreeMap::new();
    for id in ids {
        let bar = bars.add(ProgressBar::new(100));
        bar.set_style(style.clone());
        bar.set_prefix(id[id.len().saturating_sub(6)..].to_owned());
        tracked.insert(id.clone(), bar);
    }
    let mut ended: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Builds: the build log's milestones ("== …" stages, "= …" steps with their time,
    // "E: …" errors) are printed above the bars as they come; `image log` has it all.
    let mut logs: BTreeMap<String, (u64, String)> = BTreeMap::new();
    while ended.len() < ids.len() {
        for id in ids {
            if ended.contains_key(id) {
                continue;
            }
            let tail = &id[id.len().saturating_sub(6)..];
            if kind == "target_images" {
                let (offset, partial) = logs.entry(id.clone()).or_default();
                if let Ok((text, next, _)) = client.log(id, *offset).await {
                    *offset = next;
                    partial.push_str(&text);
                    while let Some(end) = partial.find('\n') {
                        let line: String = partial.drain(..=end).collect();
                        let line = line.trim_end();
                        if line.starts_with("= ")
                            || line.starts_with("==")
                            || line.starts_with("E: ")
                        {
                            let line = format!("{tail} {line}");
                            // Hidden bars (no terminal) print nothing, lines included.
                            if bars.is_hidden() {
                                println!("{line}");
                            } else {
                                bars.println(line).ok();
                            }
                        }
                    }
                }
            }
            let doc = client.get_json(&format!("/{kind}/{id}")).await?;
            let row = status_row(kind, id, &doc);
            let bar = &tracked[id];
            // Ids of one build differ at their end (they are time-ordered).
            bar.set_prefix(format!("{:<12} {tail}", row[2]));
            bar.set_position(row[4].parse().unwrap_or(0));
            bar.set_message(format!("{} {}", row[3], row[5]));
            if ["COMPLETE", "FAILED", "CANCELLED"].contains(&row[3].as_str()) {
                bar.finish();
                ended.insert(id.clone(), row);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bars.clear().ok();
    let rows: Vec<Vec<String>> = ids.iter().map(|id| ended[id].clone()).collect();
    let failed = rows.iter().filter(|r| r[3] != "COMPLETE").count();
    if client.output == Output::Table {
        table(
            &["kind", "id", "where", "status", "percent", "detail"],
            &rows,
        );
    }
    if failed > 0 {
        bail!("{failed} of {} did not complete", rows.len());
    }
    Ok(())
}

pub async fn provider(connection: &Connection, command: ProviderCommand) -> anyhow::Result<()> {
    let client = Client::new(connection)?;
    use reqwest::Method;
    let value = match command {
        ProviderCommand::List => {
            let value = client.call(Method::GET, "/providers", None).await?;
            if let Some(value) = value {
                let rows: Vec<Vec<String>> = list(root(&value))
                    .iter()
                    .map(|p| vec![text(&p["id"]), text(&p["name"]), text(&p["provider_type"])])
                    .collect();
                table(&["id", "name", "type"], &rows);
            }
            return Ok(());
        }
        ProviderCommand::Show { id } => {
            client
                .call(Method::GET, &format!("/providers/{id}"), None)
                .await?
        }
        ProviderCommand::Types => {
            let value = client.call(Method::GET, "/provider_types", None).await?;
            if let Some(value) = value {
                list_table(&value, &["id", "name"]);
            }
            return Ok(());
        }
        ProviderCommand::Type { id } => {
            let value = client
                .call(Method::GET, &format!("/provider_types/{id}"), None)
                .await?;
            if let Some(value) = value {
                let kind = root(&value);
                println!(
                    "{} ({}), builds {}",
                    text(&kind["name"]),
                    text(&kind["id"]),
                    text(&kind["format"])
                );
                let settings: Vec<String> = list(&kind["settings"]).iter().map(text).collect();
                println!(
                    "provider settings: {}",
                    if settings.is_empty() {
                        "none".into()
                    } else {
                        settings.join(", ")
                    }
                );
                println!("account credentials:");
                let rows: Vec<Vec<String>> = list(&kind["credential_definitions"])
                    .iter()
                    .map(|c| {
                        let required = text(&c["required"]) == "true";
                        vec![
                            text(&c["name"]),
                            text(&c["label"]),
                            text(&c["input_type"]),
                            if required { "yes" } else { "no" }.into(),
                        ]
                    })
                    .collect();
                table(&["name", "label", "input", "required"], &rows);
            }
            return Ok(());
        }
        ProviderCommand::Create {
            name,
            kind,
            settings,
        } => {
            let settings: String = settings
                .iter()
                .map(|(k, v)| format!("<setting name='{}'>{}</setting>", esc(k), esc(v)))
                .collect();
            let body = format!(
                "<provider><name>{}</name><provider_type id='{}'/><settings>{settings}</settings></provider>",
                esc(&name),
                esc(&kind)
            );
            client.call(Method::POST, "/providers", Some(body)).await?
        }
        ProviderCommand::Delete { id } => {
            client
                .call(Method::DELETE, &format!("/providers/{id}"), None)
                .await?;
            if client.output == Output::Table {
                println!("deleted provider {id}");
            }
            return Ok(());
        }
    };
    if let Some(value) = value {
        show_table(&value);
    }
    Ok(())
}

pub async fn account(connection: &Connection, command: AccountCommand) -> anyhow::Result<()> {
    let client = Client::new(connection)?;
    use reqwest::Method;
    let value = match command {
        AccountCommand::List => {
            if let Some(value) = client.call(Method::GET, "/provider_accounts", None).await? {
                let rows: Vec<Vec<String>> = list(root(&value))
                    .iter()
                    .map(|a| {
                        vec![
                            text(&a["id"]),
                            text(&a["name"]),
                            text(&a["provider"]),
                            text(&a["provider_type"]),
                        ]
                    })
                    .collect();
                table(&["id", "label", "provider", "type"], &rows);
            }
            return Ok(());
        }
        AccountCommand::Show { id } => {
            client
                .call(Method::GET, &format!("/provider_accounts/{id}"), None)
                .await?
        }
        AccountCommand::Create {
            provider,
            label,
            credentials,
            environment,
        } => {
            let credentials: String = credentials
                .iter()
                .map(|(k, v)| format!("<{k}>{}</{k}>", esc(v)))
                .collect();
            let body = format!(
                "<provider_account><label>{}</label><credentials>{credentials}</credentials></provider_account>",
                esc(&label)
            );
            // Asked as JSON whatever the output, for the new account's id.
            let (_, text_body) = client
                .send(
                    Method::POST,
                    &format!("/providers/{provider}/provider_accounts"),
                    Some(body),
                    true,
                )
                .await?;
            let answer: Value = serde_json::from_str(&text_body)?;
            let id = text(&root(&answer)["id"]);
            if let Some(environment) = environment {
                client
                    .send(
                        Method::PUT,
                        &format!("/pool_families/{environment}/provider_accounts/{id}"),
                        Some(String::new()),
                        true,
                    )
                    .await?;
            }
            match client.output {
                Output::Table => Some(answer),
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&answer)?);
                    None
                }
                Output::Xml => {
                    let (_, xml) = client
                        .send(
                            Method::GET,
                            &format!("/provider_accounts/{id}"),
                            None,
                            false,
                        )
                        .await?;
                    println!("{xml}");
                    None
                }
            }
        }
        AccountCommand::Delete { id } => {
            client
                .call(Method::DELETE, &format!("/provider_accounts/{id}"), None)
                .await?;
            if client.output == Output::Table {
                println!("deleted account {id}");
            }
            return Ok(());
        }
    };
    if let Some(value) = value {
        show_table(&value);
    }
    Ok(())
}
