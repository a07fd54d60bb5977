//! `conductor image …`: build, push, list, show, follow and delete images.

use super::*;

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
        ImageCommand::Diff { a, b } => {
            let left = packages(&client.get_json(&format!("/target_images/{a}/sbom")).await?);
            let right = packages(&client.get_json(&format!("/target_images/{b}/sbom")).await?);
            let rows = package_changes(&left, &right);
            if client.output != Output::Table {
                // For scripts: one object per difference, none when they agree.
                let changes: Vec<Value> = rows
                    .iter()
                    .map(|row| {
                        serde_json::json!({
                            "change": row[0], "package": row[1], "a": row[2], "b": row[3],
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&changes)?);
            } else if rows.is_empty() {
                println!("{a} and {b} hold the same {} packages", left.len());
            } else {
                table(&["", "package", &a, &b], &rows);
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
    let mut unfollowed = std::collections::BTreeSet::new();
    while ended.len() < ids.len() {
        for id in ids {
            if ended.contains_key(id) {
                continue;
            }
            let tail = &id[id.len().saturating_sub(6)..];
            if kind == "target_images" {
                let (offset, partial) = logs.entry(id.clone()).or_default();
                let fetched = match unfollowed.contains(id) {
                    true => None,
                    false => Some(client.log(id, *offset).await),
                };
                if let Some(Err(e)) = &fetched {
                    // Milestones are a help, not the point: say once why they stop.
                    eprintln!("conductor: the build log of {id} cannot be followed: {e}");
                    unfollowed.insert(id.clone());
                }
                if let Some(Ok((text, next, _))) = fetched {
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

/// The packages an SPDX document lists, by name, with their versions; the image itself
/// (the package the document describes) is left out.
fn packages(sbom: &Value) -> BTreeMap<String, String> {
    sbom["packages"]
        .as_array()
        .map(|list| &list[..])
        .unwrap_or_default()
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Image")
        .filter_map(|p| Some((p["name"].as_str()?.to_owned(), text(&p["versionInfo"]))))
        .collect()
}

/// One row per package that differs: `-` only in the first, `+` only in the second,
/// `~` in both with other versions.
fn package_changes(
    left: &BTreeMap<String, String>,
    right: &BTreeMap<String, String>,
) -> Vec<Vec<String>> {
    let names: std::collections::BTreeSet<&String> = left.keys().chain(right.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (a, b) = (left.get(name), right.get(name));
            let mark = match (a, b) {
                (Some(_), None) => "-",
                (None, Some(_)) => "+",
                (Some(a), Some(b)) if a != b => "~",
                _ => return None,
            };
            let version = |v: Option<&String>| v.cloned().unwrap_or_default();
            Some(vec![mark.to_owned(), name.clone(), version(a), version(b)])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_that_differ_are_marked() {
        let list = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let rows = package_changes(
            &list(&[("bash", "5.2"), ("gone", "1"), ("same", "2")]),
            &list(&[("bash", "5.3"), ("hello", "2.10"), ("same", "2")]),
        );
        assert_eq!(
            rows,
            [
                vec!["~", "bash", "5.2", "5.3"],
                vec!["-", "gone", "1", ""],
                vec!["+", "hello", "", "2.10"],
            ]
        );
    }
}
