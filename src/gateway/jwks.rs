//! The `jwks_url` fetchers (SPEC §2): one background task per distinct URL of the config
//! in service. Each fetches at start, then every `refresh`, and again when a handshake's
//! unknown `kid` asked for it (rate limited in [`RemoteKeys::kid_missed`]); a failed fetch
//! keeps the last good set and is retried sooner ([`RETRY_FIRST`] doubling up to
//! [`RETRY_MAX`], never later than `refresh`). Results are counted in
//! `wsgate_jwks_refresh_total{result}`. Handshakes never wait on a fetch: they read the
//! set the last successful one stored.
//!
//! HTTP is hyper-util's client over hyper-rustls (the `ring` provider, the config's roots
//! or `ca`): HTTP/1.1 only, one GET, the body capped at [`MAX_JWKS_BYTES`], the whole
//! exchange within [`FETCH_TIMEOUT`]. Redirects are not followed.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::AbortHandle;

use crate::admission::token::{JwtKeys, RemoteKeys};
use crate::shared::Shared;

/// One fetch (connect, TLS, request, whole body) must complete within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document taken: real ones are a few KiB; this bounds what a broken or
/// hostile server can make wsgate buffer.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The first retry after a failed fetch (then doubling).
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between retries of a failing fetch (and never more than `refresh`).
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// The running fetchers; dropping it stops them.
#[derive(Default)]
pub(super) struct Fetchers(Vec<AbortHandle>);

impl Drop for Fetchers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts one fetcher per source; they stop when the returned value or the gateway is
/// dropped.
pub(super) fn spawn_all(shared: &Arc<Shared>, sources: &[Arc<RemoteKeys>]) -> Fetchers {
    Fetchers(
        sources
            .iter()
            .map(|source| tokio::spawn(run(Arc::downgrade(shared), source.clone())).abort_handle())
            .collect(),
    )
}

/// Gives each source of `new` what the same URL of `old` has (keys, readiness, the
/// kid-miss window), before `new` goes into service.
pub(super) fn carry_over(old: &[Arc<RemoteKeys>], new: &[Arc<RemoteKeys>]) {
    for source in new {
        if let Some(before) = old.iter().find(|o| o.uri == source.uri) {
            source.carry_over(before);
        }
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

async fn run(shared: Weak<Shared>, source: Arc<RemoteKeys>) {
    let client = client(&source);
    let mut retry = RETRY_FIRST;
    loop {
        let result = fetch(&client, &source).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.metrics.jwks_refreshed(result.is_ok());
        drop(shared);
        let pause = match result {
            Ok(keys) => {
                tracing::debug!(url = %source.uri, keys = keys.len(), "jwks_url fetched");
                source.store(keys);
                retry = RETRY_FIRST;
                source.refresh
            }
            Err(error) => {
                tracing::warn!(
                    url = %source.uri,
                    %error,
                    kept = source.keys().len(),
                    "jwks_url fetch failed; keeping the last good keys"
                );
                let pause = retry.min(source.refresh);
                retry = (retry * 2).min(RETRY_MAX);
                pause
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = source.refetch_asked() => {}
        }
    }
}

fn client(source: &RemoteKeys) -> HttpsClient {
    let mut tls = rustls::ClientConfig::clone(&source.tls);
    // hyper-rustls sets ALPN itself (HTTP/1.1 here) and refuses a config that has one.
    tls.alpn_protocols.clear();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// One GET of the source's URL, parsed into a key set.
async fn fetch(client: &HttpsClient, source: &RemoteKeys) -> Result<JwtKeys, String> {
    let request = Request::get(source.uri.clone())
        .header(header::ACCEPT, "application/jwk-set+json, application/json")
        .header(
            header::USER_AGENT,
            concat!("wsgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            // The connector's error (DNS, TCP, TLS) is the source; the outer one only
            // says "client error (Connect)".
            match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok(body)
    };
    let body = tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no complete answer within {FETCH_TIMEOUT:?}"))??;
    let text = std::str::from_utf8(&body).map_err(|_| "the body is not UTF-8".to_string())?;
    let mut keys = JwtKeys::new();
    let load = keys.add_fetched_jwks(text)?;
    if !load.skipped.is_empty() {
        tracing::warn!(skipped = ?load.skipped, "jwks_url: keys left out of the fetched set");
    }
    Ok(keys)
}
