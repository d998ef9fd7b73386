//! A tiny HTTP/1.1 client over hyper for the web tests and the web benchmark: one connection,
//! requests in sequence, the response read in full.

#![allow(dead_code)]

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// One kept-alive connection.
pub struct Conn {
    addr: SocketAddr,
    send: SendRequest<Empty<Bytes>>,
}

/// A response, read in full.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    /// The `name=value` pair of the first `Set-Cookie`, ready to send back.
    pub fn cookie_pair(&self) -> Option<String> {
        let v = self.headers.get(hyper::header::SET_COOKIE)?.to_str().ok()?;
        Some(v.split(';').next()?.trim().to_string())
    }

    /// The whole first `Set-Cookie` value.
    pub fn set_cookie(&self) -> Option<String> {
        Some(
            self.headers
                .get(hyper::header::SET_COOKIE)?
                .to_str()
                .ok()?
                .to_string(),
        )
    }
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { addr, send })
    }

    pub async fn req(
        &mut self,
        method: Method,
        path: &str,
        cookie: Option<&str>,
    ) -> std::io::Result<Resp> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string());
        if let Some(c) = cookie {
            b = b.header(hyper::header::COOKIE, c);
        }
        let req = b.body(Empty::new()).map_err(std::io::Error::other)?;
        self.send_req(req).await
    }

    /// A request with these headers as they are (several of one name, bytes that are not
    /// UTF-8), besides `Host`.
    pub async fn req_raw(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
    ) -> std::io::Result<Resp> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string());
        for (name, value) in headers {
            b = b.header(name, value);
        }
        let req = b.body(Empty::new()).map_err(std::io::Error::other)?;
        self.send_req(req).await
    }

    async fn send_req(&mut self, req: Request<Empty<Bytes>>) -> std::io::Result<Resp> {
        self.send.ready().await.map_err(std::io::Error::other)?;
        let resp = self
            .send
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// One request on a fresh connection.
pub async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    cookie: Option<&str>,
) -> std::io::Result<Resp> {
    Conn::open(addr).await?.req(method, path, cookie).await
}
