//! The exact requests the write layer sends, against a mock API (tower-test), and what
//! the error answers mean for retries.
use http::{Request, Response};
use k8s_openapi::api::core::v1::Service;
use kandle_operator::apply::{APPLIED_HASH, apply, delete};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (kube::Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

fn service(port: i32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "smollm", "namespace": "ml"},
        "spec": {"ports": [{"name": "http", "port": port}]},
    }))
    .unwrap()
}

fn answer(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": reason})
}

async fn body(request: Request<Body>) -> Value {
    use http_body_util::BodyExt;
    serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn children_are_applied_server_side_with_one_field_manager_and_force() {
    let (client, mut handle) = client();
    let desired = service(80);
    let call = tokio::spawn(async move { apply(&client, &desired, None).await });
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request.method(), http::Method::PATCH);
    assert_eq!(
        request.uri().path(),
        "/api/v1/namespaces/ml/services/smollm"
    );
    let query = request.uri().query().unwrap();
    assert!(
        query.contains("fieldManager=kandle-operator") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(
        request.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let sent = body(request).await;
    assert_eq!(sent["apiVersion"], "v1");
    assert_eq!(sent["kind"], "Service");
    assert_eq!(sent["spec"]["ports"][0]["port"], 80);
    assert!(sent["metadata"]["annotations"][APPLIED_HASH].is_string());
    respond.send_response(answer(200, &sent));
    assert!(call.await.unwrap().unwrap(), "it wrote");
}

#[tokio::test]
async fn nothing_is_sent_when_the_cluster_already_holds_the_object() {
    let (client, mut handle) = client();
    // What the server keeps: what was applied plus its defaults.
    let first = {
        let (c, mut h) = self::client();
        let desired = service(80);
        let call = tokio::spawn(async move { apply(&c, &desired, None).await });
        let (request, respond) = h.next_request().await.unwrap();
        let mut sent = body(request).await;
        sent["spec"]["type"] = json!("ClusterIP");
        sent["spec"]["ports"][0]["protocol"] = json!("TCP");
        respond.send_response(answer(200, &sent));
        call.await.unwrap().unwrap();
        serde_json::from_value::<Service>(sent).unwrap()
    };
    // A request would never be answered here, so a write shows as a timeout.
    let unchanged = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        apply(&client, &service(80), Some(&first)),
    )
    .await
    .expect("no request was sent")
    .unwrap();
    assert!(!unchanged, "no write");
    // Someone changed it by hand: the next apply puts it back.
    let mut drifted = first.clone();
    drifted.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 9999;
    let call = tokio::spawn(async move { apply(&client, &service(80), Some(&drifted)).await });
    let (request, respond) = handle.next_request().await.unwrap();
    let sent = body(request).await;
    respond.send_response(answer(200, &sent));
    assert!(call.await.unwrap().unwrap());
}

#[tokio::test]
async fn refusals_wait_for_a_spec_change_and_outages_are_retried() {
    for (code, reason, needs_spec_change) in [
        (422, "Invalid", true),
        (400, "BadRequest", true),
        (500, "InternalError", false),
        (429, "TooManyRequests", false),
        (403, "Forbidden", false),
    ] {
        let (client, mut handle) = client();
        let call = tokio::spawn(async move { apply(&client, &service(80), None).await });
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_response(answer(code, &status(code, reason)));
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(
            error.needs_spec_change(),
            needs_spec_change,
            "{code}: {error}"
        );
        assert!(
            error.to_string().contains("apply Service smollm"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn deletes_cascade_in_the_background_and_a_missing_object_is_fine() {
    let (client, mut handle) = client();
    let gone = service(80);
    let call = tokio::spawn(async move { delete(&client, &gone).await });
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request.method(), http::Method::DELETE);
    assert_eq!(
        request.uri().path(),
        "/api/v1/namespaces/ml/services/smollm"
    );
    assert_eq!(body(request).await["propagationPolicy"], "Background");
    respond.send_response(answer(404, &status(404, "NotFound")));
    call.await.unwrap().unwrap();
}
