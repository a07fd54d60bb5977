//! `conductor provider …` and `conductor account …`.

use super::*;

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
