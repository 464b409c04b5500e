//! Rule globs, query keys and cache keys over arbitrary patterns, paths and query strings:
//! never a panic, query keys are stable (keying a key changes nothing) and made only of the
//! request's own parameters, and a bypass matched on a path holds for its decoded spelling.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecache::rules::{self, QueryKey, RawRule, Rule};

/// Multi-wildcard rules compiled once (compiling a glob per input would be most of the run).
fn fixed_rules() -> &'static [Rule] {
    static RULES: std::sync::OnceLock<Vec<Rule>> = std::sync::OnceLock::new();
    RULES.get_or_init(|| {
        ["*-*-*.js", "/assets/**/*-*.min.js", "/api/**", "*.{woff,woff2}", "/a/?/[a-c]*/**/x"]
            .into_iter()
            .map(|p| {
                Rule::compile(RawRule {
                    name: None,
                    pattern: p.into(),
                    bypass: true,
                    ttl: None,
                    force_ttl: None,
                    strip_set_cookie: false,
                })
                .expect("a valid rule")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (pattern, path, query) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let raw = RawRule {
        name: None,
        pattern: pattern.into(),
        bypass: true,
        ttl: None,
        force_ttl: None,
        strip_set_cookie: false,
    };
    let rules = fixed_rules();
    if rules::find(rules, path).is_some() {
        assert!(
            rules::bypassed(rules, path, rules::position(rules, path)),
            "a matched bypass holds"
        );
    }
    if selector == 0
        && let Ok(rule) = Rule::compile(raw)
    {
        let matched = rule.matches(path);
        let rules = [rule];
        assert!(
            !matched || rules::bypassed(&rules, path, rules::position(&rules, path)),
            "a matched bypass holds"
        );
    }
    for mode in [
        QueryKey::All,
        QueryKey::Deny(vec!["utm_source".into(), "v".into()]),
        QueryKey::Allow(vec!["v".into()]),
    ] {
        let once = rules::key_query(query, &mode);
        assert_eq!(rules::key_query(&once, &mode), once, "keying is stable");
        let pieces: Vec<&str> = query.split('&').collect();
        assert!(once.split('&').filter(|p| !p.is_empty()).all(|p| pieces.contains(&p)));
    }
    if let Ok(req) = http::Request::builder()
        .uri(format!("/{}", path.trim_start_matches('/')))
        .header("host", pattern)
        .body(())
    {
        if let Some(key) = sidecache::cache::key::CacheKey::from_request(&req, "http", &QueryKey::All) {
            assert!(key.as_str().starts_with("http://"));
        }
    }
});
