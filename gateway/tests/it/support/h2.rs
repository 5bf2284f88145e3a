//! SSE over a raw HTTP/2 connection (hyper's client), where each DATA frame can be seen.

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;

use super::within;

/// Opens `GET uri` as an event stream on the connection; asserts a 200 over HTTP/2 and gives
/// the response's body.
pub async fn open_h2_stream(
    sender: &mut SendRequest<Empty<Bytes>>,
    uri: String,
) -> hyper::body::Incoming {
    let request = hyper::Request::get(uri)
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.ready().await.unwrap();
    let response = within("SSE response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    response.into_body()
}
