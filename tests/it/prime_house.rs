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
