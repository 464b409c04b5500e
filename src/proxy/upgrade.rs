//! Tunnelling upgrades (WebSocket, ...): passed to the app, spliced to the client on `101`.

use std::net::SocketAddr;

use http::header;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::body;
use crate::proxy::Proxy;
use crate::proxy::fetch::relay_response;
use crate::proxy::outcome::{Answer, Fwd, Outcome};

impl Proxy {
    /// Passes an `Upgrade` request (WebSocket, ...) to the app and, on `101`, splices the two
    /// connections together.
    pub(super) async fn tunnel(&self, mut req: Request<Incoming>, client: SocketAddr) -> Answer {
        let upgrade_header = req.headers().get(header::UPGRADE).cloned();
        let client_upgrade = hyper::upgrade::on(&mut req);
        let mut req = req.map(body::boxed);
        self.upstream.clean(req.headers_mut());
        self.upstream.prepare(&mut req, client, upgrade_header);
        let mut resp = match self.upstream.send(req).await {
            Ok(resp) => resp,
            Err(err) => {
                warn!(error = %err, "upstream upgrade request failed");
                return Answer::new(err.response(), Outcome::Error, Some(Fwd::Bypass));
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Answer::new(relay_response(resp), Outcome::Bypass, Some(Fwd::Bypass));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client_io, app_io)) => {
                    let mut client_io = TokioIo::new(client_io);
                    let mut app_io = TokioIo::new(app_io);
                    match tokio::io::copy_bidirectional(&mut client_io, &mut app_io).await {
                        Ok((up, down)) => debug!(up, down, "tunnel closed"),
                        Err(e) => debug!(error = %e, "tunnel ended with an error"),
                    }
                }
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        Answer::new(
            Response::from_parts(parts, body::empty()),
            Outcome::Bypass,
            Some(Fwd::Bypass),
        )
    }
}

pub(super) fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && crate::policy::fields::contains_token(req.headers(), &header::CONNECTION, "upgrade")
        // h2c upgrade is deprecated (RFC 9113 §3.1) and hop-by-hop: serve it as HTTP/1.1.
        && !req.headers().get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"h2c"))
}
