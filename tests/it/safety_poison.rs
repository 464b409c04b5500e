//! Issue 25 (safety, round 2), the request side: what one client's request leaves behind for
//! others. A `Vary`-ed field the client nominated as hop-by-hop, a GET body the app does not
//! read (CL.0), a purge undone by a fill in flight, a guessed lifetime for one user's script,
//! and a 304 that relabels a body. Each test is a victim and an attacker over real sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::origin::owned;
use crate::support::{Behaviour, Origin, TestSidecar, app_client, client, eventually, raw_until_close};

fn cache_status(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Waits until no fill holds a reservation: the last one committed (or was dropped).
async fn settle(sc: &TestSidecar) {
    let cache = sc.sidecar.proxy.cache().clone();
    assert!(
        eventually(Duration::from_secs(10), async || cache.stats().2 == 0).await,
        "a fill never ended"
    );
}

// Item 1: a `Vary`-ed field named in `Connection`.

/// The attacker's `Origin` (and `X-Variant`) are removed before the app as hop-by-hop, so the
/// app answers for none; that answer must be keyed for none too, never for the value the
/// attacker sent, or every victim sending that value gets the answer for none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vary_field_named_in_connection_cannot_poison_the_variant_of_its_value() {
    let origin = Origin::start().await;
    origin.route(
        "/cors",
        Behaviour::Reflect {
            headers: owned(&[
                ("cache-control", "public, max-age=600"),
                ("content-type", "text/plain"),
                ("vary", "origin, x-variant"),
            ]),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    for (field, value) in [("origin", "https://shop.example"), ("x-variant", "b")] {
        let attack = raw_until_close(
            sc.addr,
            format!(
                "GET /cors HTTP/1.1\r\nHost: app.example\r\n{field}: {value}\r\nConnection: close, {field}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(attack.starts_with("HTTP/1.1 200"), "{attack}");
        assert!(
            !attack.contains(&format!("{field}: {value}\n")),
            "the app never saw it:\n{attack}"
        );
        settle(&sc).await;
        // The victim sends the same value the ordinary way: the app's answer for it.
        let victim = app_client()
            .get(sc.url("/cors"))
            .header(field, value)
            .send()
            .await
            .unwrap();
        let body = victim.text().await.unwrap();
        assert!(
            body.contains(&format!("{field}: {value}\n")),
            "the victim got the answer built without its {field}:\n{body}"
        );
    }
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split its cookie into crumbs; the app (spoken to in
/// HTTP/1.1) gets them joined into one line, as a browser's HTTP/1.1 request would carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_reach_the_app_as_one_cookie_line() {
    let origin = Origin::start().await;
    origin.route(
        "/me",
        Behaviour::Reflect {
            headers: owned(&[("cache-control", "no-store"), ("content-type", "text/plain")]),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for crumb in ["a=1", "b=2", "session=alice"] {
        headers.append("cookie", crumb.parse().unwrap());
    }
    let resp = h2.get(sc.url("/me")).headers(headers).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let body = resp.text().await.unwrap();
    let lines: Vec<&str> = body.lines().filter(|l| l.starts_with("cookie:")).collect();
    assert_eq!(lines, ["cookie: a=1; b=2; session=alice"], "{body}");
}

// Item 2: a GET body the app does not read (CL.0).

/// An app that reads requests off a keep-alive connection without reading a GET's body (as
/// many do): it takes the body's bytes for the next request. Every request it parses is
/// answered `served <path>`, cacheable; counts requests per path.
struct NaiveApp {
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<HashMap<String, u64>>>,
}

impl NaiveApp {
    async fn start() -> NaiveApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let hits = counted.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = vec![0u8; 8192];
                    loop {
                        // One request head: up to the blank line, no further (the body stays).
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                        *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                        let body = format!("served {path}");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/javascript\r\nCache-Control: public, max-age=600\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        NaiveApp { addr, hits }
    }

    fn hits(&self, path: &str) -> u64 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The attacker's GET carries a body that is itself a request for `evil.js`, then pipelines a
/// GET for a key on the same connection. On a pooled connection to the app the smuggled
/// answer would be read as the key's and stored under it for everyone. Now a GET with a body
/// goes on a connection closed after it: no answer of the app to its body reaches anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_body_the_app_does_not_read_never_answers_another_request() {
    let app = NaiveApp::start().await;
    let sc = TestSidecar::start(&format!("http://{}", app.addr)).await;
    for i in 0..10 {
        let smuggled = "GET /assets/evil.js HTTP/1.1\r\nHost: app.example\r\n\r\n";
        let attack = format!(
            "GET /assets/y.js HTTP/1.1\r\nHost: app.example\r\nContent-Length: {}\r\n\r\n{smuggled}\
             GET /assets/key-{i}.js HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
            smuggled.len()
        );
        let answers = raw_until_close(sc.addr, attack.as_bytes()).await;
        assert!(
            !answers.contains("served /assets/evil.js"),
            "the smuggled request's answer reached the attacker's connection:\n{answers}"
        );
        settle(&sc).await;
        let victim = client()
            .get(sc.url(&format!("/assets/key-{i}.js")))
            .send()
            .await
            .unwrap();
        let status = cache_status(&victim);
        assert_eq!(
            victim.text().await.unwrap(),
            format!("served /assets/key-{i}.js"),
            "key-{i} poisoned ({status})"
        );
    }
    // The app did see the smuggled requests (it reads what it is sent): they answered no one.
    assert!(app.hits("/assets/evil.js") >= 1);
}

// Item 4: a purge while a fill is in flight.

const TAGGED: &[(&str, &str)] = &[
    ("cache-control", "public, max-age=600"),
    ("content-type", "application/javascript"),
    ("surrogate-key", "tag-a tag-b"),
];

/// A GET asks the app, a purge (or an invalidation) lands while the app's answer is on its
/// way, then the answer arrives and its fill commits: it must not be stored as fresh (hard),
/// or must be stored already marked stale (soft). Before, the next request was a hit on the
/// answer from before the purge: the purge was undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_made_while_a_fill_is_in_flight_is_not_undone_by_its_commit() {
    let origin = Origin::start().await;
    let sc = TestSidecar::start(&origin.url()).await;
    let kinds = ["url", "prefix", "tag", "all", "soft", "invalidation"];
    for kind in kinds {
        let path = format!("/p/{kind}/app.js");
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let answer = Behaviour::Fixed {
            status: 200,
            headers: owned(TAGGED),
            body: format!("version 1 of {kind}").into(),
        };
        // The first request waits at the gate; later ones (the POST, the refetch) do not.
        origin.route(
            &path,
            Behaviour::FirstThen(
                Box::new(Behaviour::Gated(gate.clone(), Box::new(answer.clone()))),
                Box::new(answer),
            ),
        );
        let url = sc.url(&path);
        let first = tokio::spawn(async move {
            let resp = app_client().get(url).send().await.unwrap();
            (cache_status(&resp), resp.text().await.unwrap())
        });
        origin.wait_hits(&path, 1).await; // the fill's request reached the app
        let purge = match kind {
            "url" => Some(format!("/purge?url={path}")),
            "prefix" => Some(format!("/purge?prefix=/p/{kind}/")),
            "tag" => Some("/purge?tag=tag-b".to_owned()),
            "all" => Some("/purge?all=true".to_owned()),
            "soft" => Some(format!("/purge?url={path}&soft=true")),
            _ => None,
        };
        match purge {
            Some(p) => {
                let resp = client().post(sc.admin_url(&p)).send().await.unwrap();
                assert_eq!(resp.status(), 200, "{kind}: {}", resp.text().await.unwrap());
            }
            None => {
                let resp = app_client().post(sc.url(&path)).body("x").send().await.unwrap();
                assert_eq!(resp.status(), 200);
            }
        }
        gate.add_permits(1);
        let (status, body) = first.await.unwrap();
        assert!(status.contains("fwd=uri-miss"), "{kind}: {status}");
        assert_eq!(body, format!("version 1 of {kind}"));
        settle(&sc).await;
        let before = origin.hits(&path);
        let again = app_client().get(sc.url(&path)).send().await.unwrap();
        let status = cache_status(&again);
        assert_eq!(again.status(), 200);
        assert_ne!(status, "sidecache; hit", "{kind}: the purge was undone");
        assert_eq!(origin.hits(&path), before + 1, "{kind}: the app was asked again");
        if kind == "soft" {
            // Stored, marked stale at the purge: revalidated (here: refetched), not a plain miss.
            assert!(status.contains("fwd=stale"), "{kind}: {status}");
        }
    }
}

// Item 8: the fingerprint heuristic and one user's script.

/// `GET /x-a1b2c3d4.js` with a session cookie, answered with no caching headers (the app
/// personalises it): the heuristic lifetime for fingerprinted names is a guess, never made for
/// a request with credentials. The next, anonymous client gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_under_a_fingerprinted_name_answered_to_a_cookie_is_not_shared() {
    let origin = Origin::start().await;
    origin.route(
        "/assets/x-a1b2c3d4.js",
        Behaviour::Reflect {
            headers: owned(&[
                ("content-type", "application/javascript"),
                ("last-modified", "Tue, 01 Jan 2019 00:00:00 GMT"),
            ]),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let victim = app_client()
        .get(sc.url("/assets/x-a1b2c3d4.js"))
        .header("cookie", "session=alice")
        .send()
        .await
        .unwrap();
    assert!(victim.text().await.unwrap().contains("session=alice"));
    settle(&sc).await;
    let anonymous = app_client().get(sc.url("/assets/x-a1b2c3d4.js")).send().await.unwrap();
    let status = cache_status(&anonymous);
    let body = anonymous.text().await.unwrap();
    assert!(
        !body.contains("alice"),
        "alice's script reached another client ({status}):\n{body}"
    );
    assert_eq!(origin.hits("/assets/x-a1b2c3d4.js"), 2);
    // Without a cookie the heuristic still serves apps without caching headers.
    settle(&sc).await;
    let again = app_client().get(sc.url("/assets/x-a1b2c3d4.js")).send().await.unwrap();
    assert_eq!(cache_status(&again), "sidecache; hit");
}

// Item 9: a 304 and the coding of the body a client holds.

/// A script validated by `Last-Modified` alone is fetched as identity before its variants
/// exist; the client revalidates later, accepting `br`: the 304 must not say
/// `Content-Encoding: br` (RFC 9110 §15.4.5 lists what a 304 carries), or a cache downstream
/// merging it relabels its identity body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_carries_no_representation_fields_that_would_relabel_the_clients_body() {
    let origin = Origin::start().await;
    let lm = "Tue, 01 Jan 2019 00:00:00 GMT";
    let script = "function f() { return 'sidecache'; }\n".repeat(2000);
    origin.fixed(
        "/app.js",
        &[
            ("cache-control", "public, max-age=600"),
            ("content-type", "application/javascript"),
            ("last-modified", lm),
        ],
        script.clone(),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let identity = client().get(sc.url("/app.js")).send().await.unwrap();
    assert!(identity.headers().get("content-encoding").is_none());
    assert_eq!(identity.text().await.unwrap(), script);
    // Its variants are made after it is stored.
    let br = async || {
        let resp = client()
            .get(sc.url("/app.js"))
            .header("accept-encoding", "br")
            .send()
            .await
            .unwrap();
        resp.headers().get("content-encoding").is_some_and(|v| v == "br")
    };
    assert!(eventually(Duration::from_secs(20), br).await, "a br variant was made");
    let revalidation = client()
        .get(sc.url("/app.js"))
        .header("accept-encoding", "br")
        .header("if-modified-since", lm)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidation.status(), 304);
    let h = revalidation.headers();
    for field in ["content-encoding", "content-type", "content-length"] {
        assert!(h.get(field).is_none(), "a 304 with {field}: {:?}", h.get(field));
    }
    assert_eq!(h["last-modified"], lm);
    assert!(h.contains_key("cache-control") && h.contains_key("vary"), "{h:?}");
}

// Partial content (issue 27): a 206 stored as a span.

/// An attacker's range is stored as a span of the representation; it must never answer a
/// victim who asks for the whole body (GET or HEAD), nor a range it does not hold, nor a
/// request with several ranges: each gets the app's own answer, whole and unclipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_an_attacker_stored_never_answers_for_the_whole_body() {
    let origin = Origin::start().await;
    let whole: bytes::Bytes = (0..40_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    origin.route(
        "/app.js",
        Behaviour::Ranged {
            headers: owned(&[
                ("cache-control", "public, max-age=600"),
                ("content-type", "text/javascript"),
            ]),
            body: whole.clone(),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let c = app_client();
    let attack = c
        .get(sc.url("/app.js"))
        .header("range", "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(attack.status(), 206);
    assert!(cache_status(&attack).contains("stored"), "{}", cache_status(&attack));
    assert_eq!(attack.bytes().await.unwrap().len(), 1);
    settle(&sc).await;
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 1, "the span is stored");
    let hits = origin.hits("/app.js");

    let victim = c.get(sc.url("/app.js")).send().await.unwrap();
    assert_eq!(victim.status(), 200);
    assert!(!cache_status(&victim).contains("hit"), "{}", cache_status(&victim));
    assert_eq!(victim.bytes().await.unwrap(), whole, "the whole body, from the app");
    assert_eq!(origin.hits("/app.js"), hits + 1);
    settle(&sc).await;

    // Once the whole body replaced the span, a HEAD and a range agree with it.
    let head = c.head(sc.url("/app.js")).send().await.unwrap();
    assert_eq!(head.headers()["content-length"], "40000");
    let two = c
        .get(sc.url("/app.js"))
        .header("range", "bytes=0-0,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (two.status(), two.bytes().await.unwrap()),
        (reqwest::StatusCode::OK, whole.clone())
    );

    // A fresh sidecar: the span first, then a HEAD and a range it does not hold.
    let sc = TestSidecar::start(&origin.url()).await;
    let attack = c
        .get(sc.url("/app.js"))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(attack.status(), 206);
    attack.bytes().await.unwrap();
    settle(&sc).await;
    let hits = origin.hits("/app.js");
    let head = c.head(sc.url("/app.js")).send().await.unwrap();
    assert_eq!(
        (head.status().as_u16(), &head.headers()["content-length"]),
        (200, &"40000".parse().unwrap())
    );
    let outside = c
        .get(sc.url("/app.js"))
        .header("range", "bytes=150-250")
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), 206);
    assert_eq!(outside.headers()["content-range"], "bytes 150-250/40000");
    assert_eq!(outside.bytes().await.unwrap(), whole.slice(150..=250));
    assert_eq!(
        origin.hits("/app.js"),
        hits + 2,
        "the HEAD and the range outside went to the app"
    );
}

/// What the app says of a 206 holds as of any answer, and a 206 whose body is not the range
/// it names is not stored: a victim asking the same range later gets the app's answer, not
/// the attacker's (`private`, a cookie, a guessed lifetime for an answer to a session, a body longer than the
/// range its `Content-Range` names, an unknown complete length, two `Content-Range` fields).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_answer_is_shared_only_when_any_answer_would_be_and_names_its_bytes() {
    let origin = Origin::start().await;
    let partial = |headers: &[(&str, &str)], body: &'static [u8]| Behaviour::Fixed {
        status: 206,
        headers: owned(headers),
        body: bytes::Bytes::from_static(body),
    };
    let cases: [(&str, Behaviour, Option<&str>); 6] = [
        (
            "/private",
            partial(
                &[
                    ("cache-control", "private, max-age=600"),
                    ("content-range", "bytes 0-4/10"),
                ],
                b"01234",
            ),
            None,
        ),
        (
            "/cookie",
            partial(
                &[
                    ("cache-control", "max-age=600"),
                    ("content-range", "bytes 0-4/10"),
                    ("set-cookie", "s=1"),
                ],
                b"01234",
            ),
            None,
        ),
        (
            "/session",
            partial(
                &[
                    ("last-modified", "Sat, 01 Jan 2022 00:00:00 GMT"),
                    ("content-range", "bytes 0-4/10"),
                ],
                b"01234",
            ),
            Some("s=attacker"),
        ),
        (
            "/long",
            partial(
                &[("cache-control", "max-age=600"), ("content-range", "bytes 0-1/10")],
                b"01234",
            ),
            None,
        ),
        (
            "/unknown",
            partial(
                &[("cache-control", "max-age=600"), ("content-range", "bytes 0-4/*")],
                b"01234",
            ),
            None,
        ),
        (
            "/two",
            partial(
                &[
                    ("cache-control", "max-age=600"),
                    ("content-range", "bytes 0-4/10"),
                    ("content-range", "bytes 5-9/10"),
                ],
                b"01234",
            ),
            None,
        ),
    ];
    let sc = TestSidecar::start(&origin.url()).await;
    let c = app_client();
    for (path, behaviour, cookie) in cases {
        origin.route(path, behaviour);
        let mut attack = c.get(sc.url(path)).header("range", "bytes=0-4");
        if let Some(cookie) = cookie {
            attack = attack.header("cookie", cookie);
        }
        let attack = attack.send().await.unwrap();
        assert_eq!(attack.status(), 206, "{path}");
        assert!(
            !cache_status(&attack).contains("stored"),
            "{path}: {}",
            cache_status(&attack)
        );
        attack.bytes().await.ok();
        settle(&sc).await;
        let victim = c.get(sc.url(path)).header("range", "bytes=0-4").send().await.unwrap();
        assert!(
            !cache_status(&victim).contains("hit"),
            "{path}: {}",
            cache_status(&victim)
        );
        victim.bytes().await.ok();
        assert_eq!(origin.hits(path), 2, "{path}: the victim's range went to the app");
    }
    // Only the victim's own answer at `/session`: asked without a cookie, its guess is shared.
    assert_eq!(
        sc.sidecar.proxy.cache().stats().0,
        1,
        "nothing of the attacker's stored"
    );
}
