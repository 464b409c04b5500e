//! Priming, issue 20: sitemaps read as XML, and the prime protocol's outcomes deciding retries.
//! Real sockets: an in-process origin, a sidecar, the real `sidecache prime` command.

use crate::prime::{assert_all_hits, prime, serve_assets};
use crate::support::{Origin, TestSidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sitemaps_with_namespaces_cdata_and_entities_are_primed() {
    let origin = Origin::start().await;
    let sc = TestSidecar::start(&origin.url()).await;
    let base = origin.url();
    let pages = ["/page-cdata", "/page-entities", "/page-spaced"];
    serve_assets(&origin, &pages);
    // An index with a namespace prefix, naming one sitemap; its <loc>s use CDATA, character
    // references and a space before `>`; the image extension's <image:loc> is no page.
    let index = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<sm:sitemapindex xmlns:sm="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sm:sitemap><sm:loc>{base}/pages&#46;xml</sm:loc></sm:sitemap>
</sm:sitemapindex>"#
    );
    let pages_xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"
        xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">
  <url><loc><![CDATA[http://app.example/page-cdata]]></loc>
    <image:image><image:loc>http://app.example/not-a-page.png</image:loc></image:image></url>
  <url><loc>http://app.example/page&#x2D;entities</loc></url>
  <url><loc >http://app.example/page-spaced</loc ></url>
</urlset>"#;
    let xml = [("content-type", "application/xml")];
    origin.fixed("/index.xml", &xml, index);
    origin.fixed("/pages.xml", &xml, pages_xml);
    let run = prime(&sc.admin_url(""), &["--sitemap", &format!("{base}/index.xml")], None).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("3 warmed, 0 already warm, 0 failed"),
        "{}",
        run.stdout
    );
    assert_all_hits(&sc, &origin, &pages).await;
    assert_eq!(origin.hits("/not-a-page.png"), 0, "an image:loc is not primed");
    assert_eq!(
        origin.hits("/pages.xml"),
        1,
        "the index was followed, not primed as a page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_uncacheable_objects_are_final_and_server_errors_are_retried() {
    use crate::support::origin::Behaviour;
    let origin = Origin::start().await;
    let sc = TestSidecar::start(&origin.url()).await;
    serve_assets(&origin, &["/here.js"]);
    origin.route("/missing.js", Behaviour::Status(404));
    origin.fixed("/no-store.js", &[("cache-control", "no-store")], "per user");
    origin.route("/down.js", Behaviour::Status(503));
    let asset = Behaviour::Fixed {
        status: 200,
        headers: crate::support::origin::owned(&[("cache-control", "public, max-age=600")]),
        body: "asset /flaky.js".into(),
    };
    origin.route(
        "/flaky.js",
        Behaviour::FirstThen(Box::new(Behaviour::Status(503)), Box::new(asset)),
    );
    let list = "/here.js\n/missing.js\n/no-store.js\n/down.js\n/flaky.js\n";
    // `prime` runs with --retries 1: one first round, one more for what may succeed.
    let run = prime(&sc.admin_url(""), &["--urls", "-"], Some(list)).await;
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("2 warmed, 0 already warm, 3 failed"),
        "{}",
        run.stdout
    );
    assert_eq!(origin.hits("/here.js"), 1);
    assert_eq!(origin.hits("/missing.js"), 1, "a 404 is final");
    assert_eq!(
        origin.hits("/no-store.js"),
        1,
        "an answer that may not be stored is final"
    );
    assert_eq!(origin.hits("/down.js"), 2, "a 503 is asked again");
    assert_eq!(origin.hits("/flaky.js"), 2, "a 503 is asked again, and then warms");
    for (path, why) in [
        ("/missing.js", "status 404"),
        ("/no-store.js", "not cacheable"),
        ("/down.js", "status 503"),
    ] {
        assert!(run.stderr.contains(&format!("failed: {path}: {why}")), "{}", run.stderr);
    }
    assert_all_hits(&sc, &origin, &["/here.js"]).await;
    let resp = crate::support::app_client()
        .get(sc.url("/flaky.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-status"], "sidecache; hit");
    assert_eq!(origin.hits("/flaky.js"), 2);
}
