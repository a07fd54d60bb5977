//! Several teams on one server: users, roles per environment, and isolation
//! (docs/permissions.md, row by row), and credentials that never appear in clear text.

use crate::harness::{PASSWORD, Reply, Server, template};
use reqwest::Method;

const USER_PASSWORD: &str = "password-123";

async fn admin_put(server: &Server, path: &str, body: &str) -> Reply {
    server
        .as_user("admin", PASSWORD, Method::PUT, path, body)
        .await
}

async fn admin_post(server: &Server, path: &str, body: &str) -> Reply {
    let reply = server.post(path, body).await;
    assert!((200..300).contains(&reply.status), "{path}: {}", reply.body);
    reply
}

fn build_in(env: &str) -> String {
    format!(
        "<image><targets>mock</targets><tdl>{}</tdl><environment>{env}</environment></image>",
        template("tenant")
    )
}

/// Two environments with an account each, and users with roles in them.
struct World {
    server: Server,
    _dir: tempfile::TempDir,
    /// beta's image, build, target image, provider image and account id.
    b_image: String,
    b_build: String,
    b_ti: String,
    b_pi: String,
    b_account: String,
    a_account: String,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    admin_post(
        &server,
        "/api/pool_families",
        "<pool_family><name>alpha</name></pool_family>",
    )
    .await;
    admin_post(
        &server,
        "/api/pool_families",
        "<pool_family><name>beta</name></pool_family>",
    )
    .await;
    let account = |label: &str, env: &str| {
        format!(
            "<provider_account><label>{label}</label><provider id='1'/><environment>{env}</environment>\
             <credentials><username>u</username><password>p</password></credentials></provider_account>"
        )
    };
    let a = admin_post(
        &server,
        "/api/provider_accounts",
        &account("a-acc", "alpha"),
    )
    .await;
    let b = admin_post(&server, "/api/provider_accounts", &account("b-acc", "beta")).await;
    for (name, role) in [
        ("alice", "<role environment='alpha'>image_admin</role>"),
        ("avery", "<role environment='alpha'>admin</role>"),
        ("victor", "<role environment='alpha'>viewer</role>"),
        ("bob", "<role environment='beta'>image_admin</role>"),
    ] {
        admin_post(
            &server,
            "/api/users",
            &format!("<user><name>{name}</name><password>{USER_PASSWORD}</password><roles>{role}</roles></user>"),
        )
        .await;
    }
    let built = server
        .as_user(
            "bob",
            USER_PASSWORD,
            Method::POST,
            "/api/images",
            &build_in("beta"),
        )
        .await;
    assert_eq!(built.status, 200, "{}", built.body);
    let b_image = built
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let b_build = built.ids("build")[0].clone();
    let b_ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{b_ti}"))
        .await;
    let pushed = server
        .as_user(
            "bob",
            USER_PASSWORD,
            Method::POST,
            "/api/provider_images",
            &format!("<provider_image><provider_account>b-acc</provider_account><target_image_id>{b_ti}</target_image_id></provider_image>"),
        )
        .await;
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    let b_pi = pushed.ids("provider_image")[0].clone();
    server
        .wait_terminal(&format!("/api/provider_images/{b_pi}"))
        .await;
    World {
        server,
        _dir: dir,
        b_image,
        b_build,
        b_ti,
        b_pi,
        b_account: b.ids("provider_account")[0].clone(),
        a_account: a.ids("provider_account")[0].clone(),
    }
}

/// What the administrator sees of the whole server, to show a refused request changed
/// nothing.
async fn snapshot(server: &Server) -> Vec<String> {
    let mut all = Vec::new();
    for path in [
        "/api/images",
        "/api/builds",
        "/api/target_images",
        "/api/provider_images",
        "/api/provider_accounts",
        "/api/pool_families",
        "/api/environments/beta",
    ] {
        all.push(server.get(path).await.body);
    }
    all
}

#[tokio::test]
async fn a_user_of_one_environment_finds_nothing_of_another() {
    let w = world().await;
    let s = &w.server;
    let before = snapshot(s).await;
    let (i, b, t, p, acc) = (&w.b_image, &w.b_build, &w.b_ti, &w.b_pi, &w.b_account);
    // The administrator reads beta's image first, so the server keeps its document in
    // memory: the refusals below must hold on that path too.
    assert_eq!(s.get(&format!("/api/images/{i}")).await.status, 200);
    let push_b = format!(
        "<provider_image><provider_account>mock-acc</provider_account><image_id>{i}</image_id></provider_image>"
    );
    let import_b = "<image><target_identifier>x</target_identifier><image_descriptor><image><name>n</name></image></image_descriptor>\
                    <provider_account_name>b-acc</provider_account_name><environment>alpha</environment></image>";
    let cases: Vec<(Method, String, String, u16, &str)> = vec![
        (
            Method::GET,
            format!("/api/images/{i}"),
            String::new(),
            404,
            "ImageNotFound",
        ),
        (
            Method::GET,
            format!("/api/environments/beta/images/{i}"),
            String::new(),
            404,
            "ImageNotFound",
        ),
        (
            Method::DELETE,
            format!("/api/images/{i}"),
            String::new(),
            404,
            "ImageNotFound",
        ),
        (
            Method::GET,
            format!("/api/images/{i}/builds"),
            String::new(),
            400,
            "ImageNotFound",
        ),
        (
            Method::GET,
            format!("/api/builds/{b}"),
            String::new(),
            404,
            "BuildNotFound",
        ),
        (
            Method::DELETE,
            format!("/api/builds/{b}"),
            String::new(),
            404,
            "BuildNotFound",
        ),
        (
            Method::GET,
            format!("/api/builds/{b}/target_images"),
            String::new(),
            400,
            "BuildNotFound",
        ),
        (
            Method::GET,
            format!("/api/target_images/{t}"),
            String::new(),
            404,
            "TargetImageStatusNotFound",
        ),
        (
            Method::GET,
            format!("/api/target_images/{t}/data"),
            String::new(),
            404,
            "TargetImageNotFound",
        ),
        (
            Method::POST,
            format!("/api/target_images/{t}/cancel"),
            String::new(),
            404,
            "TargetImageNotFound",
        ),
        (
            Method::DELETE,
            format!("/api/target_images/{t}"),
            String::new(),
            404,
            "TargetImageNotFound",
        ),
        (
            Method::GET,
            format!("/api/target_images/{t}/provider_images"),
            String::new(),
            400,
            "TargetImageNotFound",
        ),
        (
            Method::GET,
            format!("/api/provider_images/{p}"),
            String::new(),
            404,
            "ProviderImageStatusNotFound",
        ),
        (
            Method::POST,
            format!("/api/provider_images/{p}/cancel"),
            String::new(),
            404,
            "ProviderImageNotFound",
        ),
        (
            Method::DELETE,
            format!("/api/provider_images/{p}"),
            String::new(),
            404,
            "ProviderImageNotFound",
        ),
        (
            Method::POST,
            "/api/provider_images".into(),
            push_b,
            404,
            "ImageNotFound",
        ),
        (
            Method::GET,
            format!("/api/provider_accounts/{acc}"),
            String::new(),
            404,
            "RecordNotFound",
        ),
        (
            Method::PUT,
            format!("/api/provider_accounts/{acc}"),
            "<provider_account><label>x</label></provider_account>".into(),
            404,
            "RecordNotFound",
        ),
        (
            Method::DELETE,
            format!("/api/provider_accounts/{acc}"),
            String::new(),
            404,
            "RecordNotFound",
        ),
        (
            Method::GET,
            "/api/environments/beta".into(),
            String::new(),
            404,
            "RecordNotFound",
        ),
        (
            Method::GET,
            "/api/pool_families/3".into(),
            String::new(),
            404,
            "RecordNotFound",
        ),
        (
            Method::GET,
            "/api/pool_families/3/provider_accounts".into(),
            String::new(),
            404,
            "RecordNotFound",
        ),
        (
            Method::PUT,
            format!("/api/pool_families/3/provider_accounts/{}", w.a_account),
            String::new(),
            404,
            "RecordNotFound",
        ),
        (
            Method::POST,
            "/api/images".into(),
            build_in("beta"),
            400,
            "ParameterDataIncorrect",
        ),
        (
            Method::POST,
            "/api/images".into(),
            import_b.into(),
            404,
            "ProviderAccountNotFound",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let reply = s
            .as_user("alice", USER_PASSWORD, method.clone(), &path, &body)
            .await;
        reply.assert_error(status, code);
    }
    // Pushing alpha's image with beta's account: the account does not exist for alice.
    let built = s
        .as_user(
            "alice",
            USER_PASSWORD,
            Method::POST,
            "/api/images",
            &build_in("alpha"),
        )
        .await;
    let a_ti = built.ids("target_image")[0].clone();
    s.wait_terminal(&format!("/api/target_images/{a_ti}")).await;
    let refused = s
        .as_user(
            "alice",
            USER_PASSWORD,
            Method::POST,
            "/api/provider_images",
            &format!("<provider_image><provider_account>b-acc</provider_account><target_image_id>{a_ti}</target_image_id></provider_image>"),
        )
        .await;
    refused.assert_error(404, "ProviderAccountNotFound");

    // Lists leave beta out.
    for (path, element) in [
        ("/api/images", "image"),
        ("/api/builds", "build"),
        ("/api/target_images", "target_image"),
        ("/api/provider_images", "provider_image"),
    ] {
        let list = s
            .as_user("alice", USER_PASSWORD, Method::GET, path, "")
            .await;
        assert_eq!(list.status, 200);
        let ids = list.ids(element);
        assert!(
            ![i, b, t, p].iter().any(|x| ids.contains(x)),
            "{path}: {}",
            list.body
        );
    }
    let beta_list = s
        .as_user(
            "alice",
            USER_PASSWORD,
            Method::GET,
            "/api/environments/beta/images",
            "",
        )
        .await;
    // A 200 that lists nothing, not an error that lists nothing.
    assert_eq!(beta_list.status, 200, "{}", beta_list.body);
    assert!(beta_list.ids("image").is_empty());
    let envs = s
        .as_user("alice", USER_PASSWORD, Method::GET, "/api/environments", "")
        .await;
    assert_eq!(envs.status, 200, "{}", envs.body);
    assert!(envs.body.contains("alpha"), "{}", envs.body);
    assert!(!envs.body.contains("beta"), "{}", envs.body);
    let accounts = s
        .as_user(
            "alice",
            USER_PASSWORD,
            Method::GET,
            "/api/provider_accounts",
            "",
        )
        .await;
    assert_eq!(accounts.status, 200, "{}", accounts.body);
    assert!(accounts.body.contains("a-acc"), "{}", accounts.body);
    assert!(!accounts.body.contains("b-acc"), "{}", accounts.body);

    // Nothing of beta changed, except alice's own alpha image.
    s.delete(&format!(
        "/api/images/{}",
        built.doc().root_element().attribute("id").expect("id")
    ))
    .await;
    assert_eq!(snapshot(s).await, before);
}

#[tokio::test]
async fn each_role_may_do_what_the_permission_table_says() {
    let w = world().await;
    let s = &w.server;
    let as_ = |user: &'static str, method: Method, path: String, body: String| async move {
        s.as_user(user, USER_PASSWORD, method, &path, &body).await
    };
    // viewer: sees, but acts on nothing.
    assert_eq!(
        as_(
            "victor",
            Method::POST,
            "/api/images".into(),
            build_in("alpha")
        )
        .await
        .assert_error(403, "PermissionDenied"),
        "Insufficient privileges to perform the requested action."
    );
    // image_admin: builds, pushes, deletes; no accounts.
    let built = as_(
        "alice",
        Method::POST,
        "/api/images".into(),
        build_in("alpha"),
    )
    .await;
    assert_eq!(built.status, 200, "{}", built.body);
    let image = built
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let ti = built.ids("target_image")[0].clone();
    s.wait_terminal(&format!("/api/target_images/{ti}")).await;
    assert_eq!(
        as_(
            "victor",
            Method::GET,
            format!("/api/images/{image}"),
            String::new()
        )
        .await
        .status,
        200
    );
    assert_eq!(
        as_(
            "victor",
            Method::GET,
            format!("/api/target_images/{ti}/data"),
            String::new()
        )
        .await
        .status,
        200
    );
    let push = format!(
        "<provider_image><provider_account>a-acc</provider_account><target_image_id>{ti}</target_image_id></provider_image>"
    );
    as_(
        "victor",
        Method::POST,
        "/api/provider_images".into(),
        push.clone(),
    )
    .await
    .assert_error(403, "PermissionDenied");
    as_(
        "victor",
        Method::DELETE,
        format!("/api/images/{image}"),
        String::new(),
    )
    .await
    .assert_error(403, "PermissionDenied");
    as_(
        "victor",
        Method::POST,
        format!("/api/target_images/{ti}/cancel"),
        String::new(),
    )
    .await
    .assert_error(403, "PermissionDenied");
    let pushed = as_("alice", Method::POST, "/api/provider_images".into(), push).await;
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    let pi = pushed.ids("provider_image")[0].clone();
    s.wait_terminal(&format!("/api/provider_images/{pi}")).await;

    let new_account = "<provider_account><label>a-acc2</label><provider id='1'/><environment>alpha</environment>\
                       <credentials><username>u</username><password>p</password></credentials></provider_account>";
    as_(
        "victor",
        Method::POST,
        "/api/provider_accounts".into(),
        new_account.into(),
    )
    .await
    .assert_error(403, "PermissionDenied");
    as_(
        "alice",
        Method::POST,
        "/api/provider_accounts".into(),
        new_account.into(),
    )
    .await
    .assert_error(403, "PermissionDenied");
    // Credentials only to those who administer the account.
    let shown = as_(
        "alice",
        Method::GET,
        format!("/api/provider_accounts/{}", w.a_account),
        String::new(),
    )
    .await;
    assert_eq!(shown.status, 200);
    assert!(!shown.body.contains("<password>"), "{}", shown.body);
    // env admin: accounts and membership of alpha.
    let created = as_(
        "avery",
        Method::POST,
        "/api/provider_accounts".into(),
        new_account.into(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let shown = as_(
        "avery",
        Method::GET,
        format!("/api/provider_accounts/{}", w.a_account),
        String::new(),
    )
    .await;
    assert_eq!(shown.text("password"), "p");
    assert_eq!(
        as_(
            "avery",
            Method::PUT,
            format!("/api/pool_families/2/provider_accounts/{}", w.a_account),
            String::new()
        )
        .await
        .status,
        204
    );
    // ... but not beta's account, which does not exist for avery.
    as_(
        "avery",
        Method::PUT,
        format!("/api/pool_families/2/provider_accounts/{}", w.b_account),
        String::new(),
    )
    .await
    .assert_error(404, "RecordNotFound");
    as_(
        "alice",
        Method::PUT,
        format!("/api/pool_families/2/provider_accounts/{}", w.a_account),
        String::new(),
    )
    .await
    .assert_error(403, "PermissionDenied");
    // Global-only actions are refused to an environment admin.
    for (method, path, body) in [
        (
            Method::POST,
            "/api/providers",
            "<provider><name>p2</name><provider_type id='mock'/></provider>",
        ),
        (Method::DELETE, "/api/providers/1", ""),
        (
            Method::POST,
            "/api/pool_families",
            "<pool_family><name>gamma</name></pool_family>",
        ),
        (Method::DELETE, "/api/pool_families/2", ""),
        (Method::GET, "/api/users", ""),
        (
            Method::POST,
            "/api/users",
            "<user><name>x</name><password>xxxxxxxxxx</password></user>",
        ),
        (
            Method::POST,
            "/api/hooks",
            "<hook><uri>http://127.0.0.1:1/</uri><version>1</version></hook>",
        ),
        (Method::POST, "/api/provider_types/rescan", ""),
    ] {
        let reply = as_("avery", method, path.into(), body.into()).await;
        reply.assert_error(403, "PermissionDenied");
    }
    // image_admin deletes.
    assert_eq!(
        as_(
            "alice",
            Method::DELETE,
            format!("/api/images/{image}"),
            String::new()
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn users_are_created_listed_and_disabled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(dir.path());
    let created = admin_post(&s, "/api/users.xml", &format!("<user><name>carol</name><password>{USER_PASSWORD}</password><roles><role environment='default'>viewer</role></roles></user>")).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.text("role"), "viewer");
    assert_eq!(s.get("/api/users").await.ids("user"), ["admin", "carol"]);
    assert_eq!(
        s.as_user("carol", USER_PASSWORD, Method::GET, "/api/images", "")
            .await
            .status,
        200
    );
    for (body, problem) in [
        (
            "<user><name>carol</name><password>password-123</password></user>",
            "Name has already been taken",
        ),
        (
            "<user><name>dave</name><password>short</password></user>",
            "Password is too short (minimum is 8 characters)",
        ),
        (
            "<user><name>dave</name><password>password-123</password><roles><role environment='nowhere'>viewer</role></roles></user>",
            "Environment nowhere was not found.",
        ),
        (
            "<user><name>dave</name><password>password-123</password><roles><role environment='default'>king</role></roles></user>",
            "Role king is not one of admin, image_admin, viewer",
        ),
    ] {
        let reply = s.post("/api/users", body).await;
        assert_eq!(reply.status, 422, "{}", reply.body);
        assert!(reply.body.contains(problem), "{}", reply.body);
    }
    let disabled = admin_put(
        &s,
        "/api/users/carol",
        "<user><disabled>true</disabled></user>",
    )
    .await;
    assert_eq!(disabled.text("disabled"), "true");
    assert_eq!(
        s.as_user("carol", USER_PASSWORD, Method::GET, "/api/images", "")
            .await
            .status,
        401
    );
    let refused = admin_put(
        &s,
        "/api/users/admin",
        "<user><disabled>true</disabled></user>",
    )
    .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(s.get("/api/images").await.status, 200);
    s.get("/api/users/nobody")
        .await
        .assert_error(404, "RecordNotFound");
}

#[tokio::test]
async fn credentials_never_appear_in_clear_in_the_database_or_the_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let secret = "Sup3r-Secret-Value-91";
    let s = Server::start_logging(&data, &["--plugins", crate::harness::TEST_PLUGINS], &log);
    let account = admin_post(
        &s,
        "/api/provider_accounts",
        &format!("<provider_account><label>secret-acc</label><provider id='1'/><credentials><username>user-{secret}</username><password>{secret}</password></credentials></provider_account>"),
    )
    .await;
    let id = account.ids("provider_account")[0].clone();
    let built = s
        .post(
            "/api/images",
            &crate::harness::build_request("mock", &template("s"), ""),
        )
        .await;
    let ti = built.ids("target_image")[0].clone();
    s.wait_terminal(&format!("/api/target_images/{ti}")).await;
    let pushed = s
        .post("/api/provider_images", &format!("<provider_image><provider_account>secret-acc</provider_account><target_image_id>{ti}</target_image_id></provider_image>"))
        .await;
    s.wait_terminal(&format!(
        "/api/provider_images/{}",
        pushed.ids("provider_image")[0]
    ))
    .await;
    s.stop();
    // The key file is private to the server's user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("credentials.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let s = Server::start_logging(
        &data,
        &["--plugins", crate::harness::TEST_PLUGINS],
        &dir.path().join("server2.log"),
    );
    assert_eq!(
        s.get(&format!("/api/provider_accounts/{id}"))
            .await
            .text("password"),
        secret
    );
    drop(s);
    for file in [
        data.join("conductor.redb"),
        log.clone(),
        dir.path().join("server2.log"),
    ] {
        let bytes = std::fs::read(&file).expect("read");
        let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "{} holds the secret in clear", file.display());
    }
    assert!(
        std::fs::metadata(&log).expect("log").len() > 0,
        "the log was empty"
    );
}
