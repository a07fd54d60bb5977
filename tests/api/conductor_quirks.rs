//! Conductor behaviours its clients rely on (reference/conductor-api.md): an account
//! outside the image's environment, `?minimal` on the provider list, and the targets an
//! environment's document lists.

use crate::harness::{Server, template};
use reqwest::Method;

const USER_PASSWORD: &str = "password-123";

async fn ok(reply: crate::harness::Reply) -> crate::harness::Reply {
    assert!((200..300).contains(&reply.status), "{}", reply.body);
    reply
}

/// alpha with `a-acc`, beta with `b-acc`, an image built in alpha; `both` is image admin
/// in alpha and viewer in beta, `alice` has a role in alpha only.
async fn world(server: &Server) -> String {
    for env in ["alpha", "beta"] {
        ok(server
            .post(
                "/api/pool_families",
                &format!("<pool_family><name>{env}</name></pool_family>"),
            )
            .await)
        .await;
        let short = &env[..1];
        ok(server
            .post(
                "/api/provider_accounts",
                &format!(
                    "<provider_account><label>{short}-acc</label><provider id='1'/><environment>{env}</environment>\
                     <credentials><username>u</username><password>p</password></credentials></provider_account>"
                ),
            )
            .await)
        .await;
    }
    for (name, roles) in [
        (
            "both",
            "<role environment='alpha'>image_admin</role><role environment='beta'>viewer</role>",
        ),
        ("alice", "<role environment='alpha'>image_admin</role>"),
    ] {
        ok(server
            .post(
                "/api/users",
                &format!("<user><name>{name}</name><password>{USER_PASSWORD}</password><roles>{roles}</roles></user>"),
            )
            .await)
        .await;
    }
    let built = ok(server
        .post(
            "/api/images",
            &format!(
                "<image><targets>mock</targets><tdl>{}</tdl><environment>alpha</environment></image>",
                template("quirk")
            ),
        )
        .await)
    .await;
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    ti
}

#[tokio::test]
async fn an_account_outside_the_environment_is_400_to_those_who_see_it_and_404_to_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let ti = world(&server).await;
    let push = format!(
        "<provider_image><target_image_id>{ti}</target_image_id><provider_account>b-acc</provider_account></provider_image>"
    );
    let expected =
        "Provider Account b-acc is not in this Environment. Valid accounts include a-acc.";
    let seen = server
        .as_user(
            "both",
            USER_PASSWORD,
            Method::POST,
            "/api/provider_images",
            &push,
        )
        .await;
    assert_eq!(seen.assert_error(400, "ParameterDataIncorrect"), expected);
    let unseen = server
        .as_user(
            "alice",
            USER_PASSWORD,
            Method::POST,
            "/api/provider_images",
            &push,
        )
        .await;
    unseen.assert_error(404, "ProviderAccountNotFound");

    let import = |env: &str| {
        format!(
            "<image><provider_account_name>b-acc</provider_account_name><target_identifier>x</target_identifier>\
             <image_descriptor><image><name>n</name></image></image_descriptor><environment>{env}</environment></image>"
        )
    };
    let seen = server
        .as_user(
            "both",
            USER_PASSWORD,
            Method::POST,
            "/api/images",
            &import("alpha"),
        )
        .await;
    assert_eq!(seen.assert_error(400, "ParameterDataIncorrect"), expected);
    let unseen = server
        .as_user(
            "alice",
            USER_PASSWORD,
            Method::POST,
            "/api/images",
            &import("alpha"),
        )
        .await;
    unseen.assert_error(404, "ProviderAccountNotFound");

    // An account taken out of every environment still exists for a global
    // administrator: 400, not 404.
    // b-acc is the last account made.
    let accounts = server.get("/api/provider_accounts").await;
    let b_id = accounts
        .ids("provider_account")
        .last()
        .expect("accounts")
        .clone();
    let beta_id = server
        .get("/api/environments/beta")
        .await
        .ids("environment")[0]
        .clone();
    let removed = server
        .delete(&format!(
            "/api/pool_families/{beta_id}/provider_accounts/{b_id}"
        ))
        .await;
    assert_eq!(removed.status, 204, "{}", removed.body);
    let admin = server.post("/api/provider_images", &push).await;
    assert_eq!(admin.assert_error(400, "ParameterDataIncorrect"), expected);
}

#[tokio::test]
async fn minimal_provider_lists_hold_only_href_and_id_whatever_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let full = server.get("/api/providers").await;
    assert!(full.body.contains("<name>"), "{}", full.body);
    for query in ["minimal=true", "minimal=false", "minimal"] {
        let reply = server.get(&format!("/api/providers?{query}")).await;
        assert_eq!(reply.status, 200);
        let doc = reply.doc();
        let providers: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("provider"))
            .collect();
        assert_eq!(providers.len(), full.ids("provider").len(), "{query}");
        for provider in providers {
            assert!(provider.attribute("href").is_some() && provider.attribute("id").is_some());
            assert_eq!(
                provider.children().filter(|c| c.is_element()).count(),
                0,
                "{query}: {}",
                reply.body
            );
        }
    }
}

#[tokio::test]
async fn environments_list_their_targets_and_the_accounts_that_serve_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    world(&server).await;
    let targets_of = |reply: &crate::harness::Reply, env: &str| -> Vec<(String, Vec<String>)> {
        let doc = reply.doc();
        let environment = doc
            .descendants()
            .find(|n| {
                n.has_tag_name("environment")
                    && n.children()
                        .any(|c| c.has_tag_name("name") && c.text() == Some(env))
            })
            .unwrap_or_else(|| panic!("{env} in {}", reply.body));
        let targets = environment
            .children()
            .find(|c| c.has_tag_name("targets"))
            .unwrap_or_else(|| panic!("no <targets> in {}", reply.body));
        assert_eq!(targets.attribute("type"), Some("xs:list"));
        targets
            .children()
            .filter(|t| t.has_tag_name("target"))
            .map(|t| {
                let accounts = t
                    .children()
                    .filter(|a| a.has_tag_name("account"))
                    .filter_map(|a| a.attribute("name").map(str::to_owned))
                    .collect();
                (t.attribute("name").unwrap_or("").to_owned(), accounts)
            })
            .collect()
    };
    let list = server.get("/api/environments").await;
    let alpha = vec![("mock".to_owned(), vec!["a-acc".to_owned()])];
    assert_eq!(targets_of(&list, "alpha"), alpha);
    assert_eq!(
        targets_of(&list, "beta"),
        vec![("mock".to_owned(), vec!["b-acc".to_owned()])]
    );
    let show = server.get("/api/environments/alpha").await;
    assert_eq!(targets_of(&show, "alpha"), alpha);
    // A user sees only the environments they have a role in, with their targets.
    let mine = server
        .as_user("alice", USER_PASSWORD, Method::GET, "/api/environments", "")
        .await;
    assert_eq!(mine.ids("environment").len(), 1);
    assert_eq!(targets_of(&mine, "alpha"), alpha);
}
