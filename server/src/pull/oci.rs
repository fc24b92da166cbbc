//! OCI registries: a model as an artifact, one layer per file named by its
//! `org.opencontainers.image.title` annotation, as ORAS lays files out (so `oras pull` gets
//! the same files). The distribution API's few small requests are made here, every answer
//! read with a bound; blobs come through the pull's own fetcher (verified by digest,
//! resumable, in segments), like any other source's files.
use super::Marker;
use super::credentials::Credentials;
use super::error::PullError;
use super::fetch::{Digest, RemoteFile, bounded_body};
use super::uri::OciRef;
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The artifact's type, and its config's and files' media types: kandle's own, so a
/// registry's UI and `oras` show what the artifact is.
pub const ARTIFACT_TYPE: &str = "application/vnd.kandle.model.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kandle.model.config.v1+json";
pub const FILE_MEDIA_TYPE: &str = "application/vnd.kandle.model.file.v1";
/// The annotation that names a layer's file (ORAS's convention).
pub const TITLE: &str = "org.opencontainers.image.title";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const INDEXES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// The distribution spec lets registries refuse manifests larger than this.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// A token answer is a few KiB.
const MAX_TOKEN_BYTES: usize = 1 << 20;
/// More files than any model holds, as for S3 listings.
const MAX_LAYERS: usize = 10_000;

const DENIED_ANONYMOUS: &str = "; the registry wants credentials: put OCI_USERNAME and OCI_PASSWORD, or a .dockerconfigjson, in the credentials";
const DENIED_WITH_LOGIN: &str = "; the registry credentials given cannot do this";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// What `push` writes as the manifest (an OCI 1.1 artifact).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    artifact_type: &'a str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The config blob: where the artifact's files came from.
#[derive(Serialize)]
struct ArtifactConfig<'a> {
    source: &'a str,
    revision: Option<&'a str>,
}

/// An artifact's files, and the manifest digest that pins them.
pub struct Listing {
    pub digest: String,
    pub files: Vec<RemoteFile>,
}

/// One repository of one registry, and the authorization its requests carry once the
/// registry has said what it wants.
#[derive(Clone)]
pub struct Registry {
    http: reqwest::Client,
    target: OciRef,
    uri: String,
    /// `SCHEME://REGISTRY/v2/REPOSITORY/`
    base: Url,
    login: Option<(String, String)>,
    authorization: Option<String>,
}

impl Registry {
    /// Loopback registries (and any, with `plain_http`) over HTTP; the rest over TLS.
    pub fn new(
        http: reqwest::Client,
        target: &OciRef,
        credentials: &Credentials,
        plain_http: bool,
    ) -> Result<Self, PullError> {
        let uri = target.to_string();
        let scheme = if plain_http || target.is_loopback() {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!(
            "{scheme}://{}/v2/{}/",
            target.registry, target.repository
        ))
        .map_err(|e| PullError::Refused {
            uri: uri.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            http,
            login: credentials.registry_login(&target.registry)?,
            target: target.clone(),
            uri,
            base,
            authorization: None,
        })
    }

    /// What blob requests carry (the fetcher sends it): renewed by asking the registry
    /// again when a token expires mid-pull.
    pub fn authorization(&self) -> super::Authorization {
        let this = self.clone();
        super::Authorization::renewable(
            self.authorization.clone(),
            std::sync::Arc::new(move || {
                let mut registry = this.clone();
                Box::pin(async move {
                    registry.authorize(false).await?;
                    Ok(registry.authorization)
                })
            }),
        )
    }

    pub fn denied_hint(&self) -> &'static str {
        if self.login.is_some() {
            DENIED_WITH_LOGIN
        } else {
            DENIED_ANONYMOUS
        }
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("a path under the repository")
    }

    fn error(&self, message: impl std::fmt::Display) -> PullError {
        PullError::Protocol {
            uri: self.uri.clone(),
            message: message.to_string(),
        }
    }

    fn network(&self, e: &reqwest::Error) -> PullError {
        PullError::Network {
            uri: self.uri.clone(),
            message: super::fetch::network_message(e),
        }
    }

    fn status(&self, status: StatusCode) -> PullError {
        PullError::from_status(&self.uri, status.as_u16(), self.denied_hint())
    }

    /// Asks the registry's `/v2/` what it wants, and gets it: nothing, Basic credentials,
    /// or a bearer token for this repository (`push`: with push rights) from its realm.
    async fn authorize(&mut self, push: bool) -> Result<(), PullError> {
        let root = self.base.join("/v2/").expect("the API root");
        let response = self
            .http
            .get(root)
            .send()
            .await
            .map_err(|e| self.network(&e))?;
        if response.status().is_success() {
            return Ok(());
        }
        if response.status() != StatusCode::UNAUTHORIZED {
            return Err(self.status(response.status()));
        }
        let challenge = header(&response, WWW_AUTHENTICATE);
        let challenges = http_auth::parse_challenges(&challenge)
            .map_err(|e| self.error(format!("cannot read its WWW-Authenticate header: {e}")))?;
        let param = |c: &http_auth::ChallengeRef, name: &str| {
            c.params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        if let Some(bearer) = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        {
            let realm = param(bearer, "realm")
                .ok_or_else(|| self.error("a bearer challenge without a realm"))?;
            let service = param(bearer, "service");
            let token = self.token(&realm, service.as_deref(), push).await?;
            self.authorization = Some(format!("Bearer {token}"));
            return Ok(());
        }
        if challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
        {
            let Some((user, password)) = &self.login else {
                return Err(self.status(StatusCode::UNAUTHORIZED));
            };
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            self.authorization = Some(format!("Basic {pair}"));
            return Ok(());
        }
        Err(self.error(format!(
            "it asks for an authentication scheme kandle does not speak: {}",
            challenge.chars().take(80).collect::<String>()
        )))
    }

    /// A bearer token from `realm`, given the login if there is one. Credentials go only
    /// over TLS, unless the registry itself is reached over plain HTTP.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        push: bool,
    ) -> Result<String, PullError> {
        let mut url = Url::parse(realm).map_err(|e| self.error(format!("its token realm: {e}")))?;
        if !(url.scheme() == "https" || (url.scheme() == "http" && self.base.scheme() == "http")) {
            return Err(self.error(format!(
                "its token realm `{realm}` is not HTTPS; credentials are not sent there"
            )));
        }
        let actions = if push { "pull,push" } else { "pull" };
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair(
                "scope",
                &format!("repository:{}:{actions}", self.target.repository),
            );
        }
        let mut request = self.http.get(url);
        if let Some((user, password)) = &self.login {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| self.network(&e))?;
        if !response.status().is_success() {
            return Err(self.status(response.status()));
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = bounded_body(&self.uri, response, MAX_TOKEN_BYTES).await?;
        let token: Token = serde_json::from_slice(&body)
            .map_err(|e| self.error(format!("its token answer: {e}")))?;
        token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic()))
            .ok_or_else(|| self.error("its token answer holds no usable token"))
    }

    /// The artifact's manifest resolved, checked, and turned into the files to fetch.
    pub async fn list(&mut self) -> Result<Listing, PullError> {
        self.authorize(false).await?;
        let request = self
            .http
            .get(self.url(&format!("manifests/{}", self.target.reference)))
            .header(
                ACCEPT,
                format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}, {}", INDEXES.join(", ")),
            );
        let response = self
            .with_auth(request)
            .send()
            .await
            .map_err(|e| self.network(&e))?;
        if !response.status().is_success() {
            return Err(self.status(response.status()));
        }
        let content_type = header(&response, CONTENT_TYPE);
        let body = bounded_body(&self.uri, response, MAX_MANIFEST_BYTES).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if self.target.is_digest() && digest != self.target.reference {
            return Err(PullError::Integrity {
                file: format!("{} (manifest)", self.uri),
                expected: self.target.reference.clone(),
                actual: digest,
            });
        }
        let files = self.files(&body, &content_type)?;
        Ok(Listing { digest, files })
    }

    fn files(&self, body: &[u8], content_type: &str) -> Result<Vec<RemoteFile>, PullError> {
        let manifest: Manifest =
            serde_json::from_slice(body).map_err(|e| self.error(format!("its manifest: {e}")))?;
        let media_type = manifest.media_type.as_deref().unwrap_or(content_type);
        if INDEXES.iter().any(|t| media_type.starts_with(t)) {
            return Err(self.refused(
                "it names an image index (several platforms); name one manifest by its digest"
                    .into(),
            ));
        }
        if manifest.schema_version != 2 {
            return Err(self.error(format!(
                "manifest schema version {}",
                manifest.schema_version
            )));
        }
        if manifest.layers.len() > MAX_LAYERS {
            return Err(self.refused(format!("more than {MAX_LAYERS} layers")));
        }
        manifest
            .layers
            .into_iter()
            .map(|layer| {
                let hex = layer
                    .digest
                    .strip_prefix("sha256:")
                    .filter(|_| super::uri::valid_digest(&layer.digest))
                    .ok_or_else(|| {
                        self.refused(format!(
                            "layer digest `{}` is not a sha256 digest",
                            layer.digest.escape_debug()
                        ))
                    })?;
                let path = layer.annotations.get(TITLE).ok_or_else(|| {
                    self.refused(format!(
                        "layer {} has no {TITLE} annotation: this is a container image, not a model artifact (make one with `kandle-server push`)",
                        layer.digest
                    ))
                })?;
                Ok(RemoteFile {
                    path: path.clone(),
                    url: self.url(&format!("blobs/{}", layer.digest)).into(),
                    object: None,
                    size: Some(layer.size),
                    digest: Some(Digest::Sha256(hex.to_string())),
                })
            })
            .collect()
    }

    fn refused(&self, reason: String) -> PullError {
        PullError::Refused {
            uri: self.uri.clone(),
            reason,
        }
    }

    /// Pushes the files `marker` lists from `folder` (blobs the registry has already are
    /// skipped, so a push that failed resumes), a config naming their source, and the
    /// manifest under the target's tag. Returns the manifest's digest.
    pub async fn push(
        &mut self,
        folder: &Path,
        marker: &Marker,
        concurrency: usize,
    ) -> Result<String, PullError> {
        if self.target.is_digest() {
            return Err(self.refused(
                "a push needs a tag to publish under (oci://REGISTRY/REPOSITORY:TAG)".into(),
            ));
        }
        self.authorize(true).await?;
        let config_bytes = serde_json::to_vec(&ArtifactConfig {
            source: &marker.source,
            revision: marker.revision.as_deref(),
        })
        .expect("config serializes");
        let config = Descriptor {
            media_type: CONFIG_MEDIA_TYPE.into(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
            size: config_bytes.len() as u64,
            annotations: BTreeMap::new(),
        };
        let this = &*self;
        this.put_blob(&config, config_bytes.into()).await?;
        let layers: Vec<Descriptor> = futures::stream::iter(&marker.files)
            .map(|file| async move {
                let layer = Descriptor {
                    media_type: FILE_MEDIA_TYPE.into(),
                    digest: format!("sha256:{}", file.sha256),
                    size: file.size,
                    annotations: BTreeMap::from([(TITLE.to_string(), file.path.clone())]),
                };
                let path = super::names::inside(folder, &file.path)
                    .map_err(|e| this.refused(e.to_string()))?;
                let handle = tokio::fs::File::open(&path)
                    .await
                    .map_err(PullError::io(&path))?;
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    handle,
                    1 << 20,
                ));
                this.put_blob(&layer, body).await?;
                tracing::info!(file = %file.path, bytes = file.size, "pushed");
                Ok::<_, PullError>(layer)
            })
            .buffered(concurrency.max(1))
            .try_collect()
            .await?;
        let manifest = serde_json::to_vec(&ArtifactManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            artifact_type: ARTIFACT_TYPE,
            config,
            layers,
        })
        .expect("manifest serializes");
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
        let response = self
            .with_auth(
                self.http
                    .put(self.url(&format!("manifests/{}", self.target.reference))),
            )
            .header(CONTENT_TYPE, OCI_MANIFEST)
            .body(manifest)
            .send()
            .await
            .map_err(|e| self.network(&e))?;
        if response.status() != StatusCode::CREATED {
            return Err(self.status(response.status()));
        }
        Ok(digest)
    }

    fn with_auth(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.authorization {
            Some(authorization) => request.header(AUTHORIZATION, authorization),
            None => request,
        }
    }

    /// One blob, unless the registry has it: an upload session, then one monolithic PUT.
    async fn put_blob(&self, blob: &Descriptor, body: reqwest::Body) -> Result<(), PullError> {
        let exists = self
            .with_auth(self.http.head(self.url(&format!("blobs/{}", blob.digest))))
            .send()
            .await
            .map_err(|e| self.network(&e))?;
        if exists.status().is_success() {
            return Ok(());
        }
        let session = self
            .with_auth(self.http.post(self.url("blobs/uploads/")))
            .header(CONTENT_LENGTH, 0)
            .send()
            .await
            .map_err(|e| self.network(&e))?;
        if session.status() != StatusCode::ACCEPTED {
            return Err(self.status(session.status()));
        }
        // The Location may be relative, and may carry a query of its own.
        let mut location = session
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| self.base.join(l).ok())
            .ok_or_else(|| self.error("an upload session without a Location"))?;
        location
            .query_pairs_mut()
            .append_pair("digest", &blob.digest);
        let response = self
            .with_auth(self.http.put(location))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, blob.size)
            .body(body)
            .send()
            .await
            .map_err(|e| self.network(&e))?;
        if response.status() != StatusCode::CREATED {
            return Err(self.status(response.status()));
        }
        Ok(())
    }
}

/// A header's value as text (empty when absent or not text).
fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn registry(host: &str, plain_http: bool) -> Registry {
        let target = OciRef {
            registry: host.into(),
            repository: "team/m".into(),
            reference: "v1".into(),
        };
        Registry::new(
            reqwest::Client::new(),
            &target,
            &Credentials::default(),
            plain_http,
        )
        .unwrap()
    }

    #[test]
    fn loopback_registries_are_reached_over_http_and_the_rest_over_tls() {
        assert_eq!(
            registry("127.0.0.1:5000", false).base.as_str(),
            "http://127.0.0.1:5000/v2/team/m/"
        );
        assert_eq!(registry("reg.example", false).base.scheme(), "https");
        assert_eq!(registry("reg.example", true).base.scheme(), "http");
    }

    #[test]
    fn layers_need_a_sha256_digest_and_a_title() {
        let r = registry("reg.example", false);
        let digest = format!("sha256:{}", "a".repeat(64));
        let manifest = |layer: serde_json::Value| {
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [layer]}).to_string()
        };
        let files = r
            .files(
                manifest(
                    json!({"mediaType": FILE_MEDIA_TYPE, "digest": digest, "size": 3,
                    "annotations": {TITLE: "config.json"}}),
                )
                .as_bytes(),
                "",
            )
            .unwrap();
        assert_eq!(
            (files[0].path.as_str(), files[0].size, files[0].url.as_str()),
            (
                "config.json",
                Some(3),
                format!("https://reg.example/v2/team/m/blobs/{digest}").as_str()
            )
        );
        for (layer, cause) in [
            (
                json!({"mediaType": FILE_MEDIA_TYPE, "digest": format!("sha512:{}", "a".repeat(128)),
                    "size": 3, "annotations": {TITLE: "a"}}),
                "not a sha256 digest",
            ),
            (
                json!({"mediaType": FILE_MEDIA_TYPE, "digest": "sha256:../../x", "size": 3,
                    "annotations": {TITLE: "a"}}),
                "not a sha256 digest",
            ),
            (
                json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest, "size": 3}),
                "container image",
            ),
        ] {
            let e = r.files(manifest(layer).as_bytes(), "").unwrap_err();
            assert!(e.to_string().contains(cause), "{e}");
        }
        let index = json!({"schemaVersion": 2, "manifests": []}).to_string();
        let e = r
            .files(index.as_bytes(), "application/vnd.oci.image.index.v1+json")
            .unwrap_err();
        assert!(e.to_string().contains("image index"), "{e}");
    }

    proptest! {
        /// Any bytes a registry sends as a manifest give files or an error, never a panic.
        #[test]
        fn any_manifest_parses_or_fails_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = registry("reg.example", false).files(&body, "");
        }
    }
}
