//! The Prometheus endpoint both daemons serve: `GET /metrics` in the text
//! exposition format, rendered at each scrape.

use std::{convert::Infallible, future::Future, net::SocketAddr};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;

/// Brings a counter to a total kept elsewhere (the kernel's, a daemon's
/// atomic): only up, or from zero again when the source started over.
pub fn set_total(c: &prometheus::IntCounter, total: u64) {
    let now = c.get();
    if total < now {
        c.reset();
        c.inc_by(total);
    } else {
        c.inc_by(total - now);
    }
}

/// A registry's metrics in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding into a Vec only fails for a malformed family, which the
    // registry refuses at registration.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics` on `listener` until the task is dropped; `render`
/// produces the page for each scrape. Anything else is answered 404/405.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: the next scrape tries again.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(req, render).await) }
            });
            // A client that breaks the connection ends only its own scrape.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer<F, Fut>(req: Request<hyper::body::Incoming>, render: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, render().await),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
        _ => (StatusCode::NOT_FOUND, "metrics are at /metrics\n".into()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Binds the metrics address (inside a tokio runtime); the error says what
/// to change: `setting` names the option that set the address.
pub fn bind(addr: SocketAddr, setting: &str) -> std::io::Result<TcpListener> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot serve metrics on {addr}: {e} (set {setting} to a free address, \
                     another instance on this host?, or \"\" to serve none)"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_follow_the_source_and_start_over_with_it() {
        let c = prometheus::IntCounter::new("t_total", "t").unwrap();
        set_total(&c, 10);
        set_total(&c, 25);
        assert_eq!(c.get(), 25);
        set_total(&c, 3);
        assert_eq!(c.get(), 3);
    }
}
