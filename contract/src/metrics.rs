//! The server's Prometheus metrics that the operator reads: load for the autoscaler and
//! request counters for canary verdicts. The server registers these names under
//! [`PREFIX`]; [`parse`] is how the operator reads them back.

/// Prefix of every server metric (`kandle_…`).
pub const PREFIX: &str = "kandle";
/// Gauge: requests being executed.
pub const REQUESTS_IN_FLIGHT: &str = "requests_in_flight";
/// Gauge: requests admitted and waiting for the model.
pub const REQUESTS_QUEUED: &str = "requests_queued";
/// Counter (exposed with `_total`): requests answered, labelled by [`CODE_LABEL`].
pub const REQUESTS: &str = "requests";
/// The HTTP status code label of [`REQUESTS`].
pub const CODE_LABEL: &str = "code";

/// Gauge of the gateway: requests held for a ModelDeployment that has no ready pod (scaled
/// to zero or still starting), labelled by [`NAMESPACE_LABEL`] and [`NAME_LABEL`]. The
/// autoscaler counts them as load: how a model scaled to zero learns it has callers.
pub const GATEWAY_HELD_REQUESTS: &str = "gateway_held_requests";
pub const NAMESPACE_LABEL: &str = "namespace";
pub const NAME_LABEL: &str = "name";

/// What one server reported.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Requests in flight plus queued.
    pub load: f64,
    /// Requests answered since the server started, and those answered with a 5xx.
    pub requests: f64,
    pub errors: f64,
}

/// Reads a server's `/metrics` text; `None` unless both load gauges are there (a server
/// that does not report its load must not be taken for an idle one).
pub fn parse(text: &str) -> Option<Load> {
    let gauge = |name| samples(text, &format!("{PREFIX}_{name}")).next();
    let load = gauge(REQUESTS_IN_FLIGHT)?.1 + gauge(REQUESTS_QUEUED)?.1;
    let server_error = format!("{CODE_LABEL}=\"5");
    let (mut requests, mut errors) = (0.0, 0.0);
    for (labels, value) in samples(text, &format!("{PREFIX}_{REQUESTS}_total")) {
        requests += value;
        if labels.contains(&server_error) {
            errors += value;
        }
    }
    (load >= 0.0).then_some(Load {
        load,
        requests,
        errors,
    })
}

/// Requests one gateway holds, per ModelDeployment (namespace, name), from its `/metrics`.
pub fn parse_held(text: &str) -> Vec<((String, String), f64)> {
    let label = |labels: &str, key: &str| {
        // Kubernetes names hold no quotes or commas, so the pairs split plainly.
        labels.split(',').find_map(|pair| {
            let value = pair.strip_prefix(key)?.strip_prefix("=\"")?;
            Some(value.strip_suffix('"')?.to_string())
        })
    };
    samples(text, &format!("{PREFIX}_{GATEWAY_HELD_REQUESTS}"))
        .filter_map(|(labels, value)| {
            let key = (label(labels, NAMESPACE_LABEL)?, label(labels, NAME_LABEL)?);
            (value >= 0.0).then_some((key, value))
        })
        .collect()
}

/// The samples of one metric: labels (the text between braces) and finite values.
fn samples<'a>(text: &'a str, name: &str) -> impl Iterator<Item = (&'a str, f64)> {
    let name = name.to_string();
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name.as_str())?;
        // The metric itself, not a longer name that starts the same.
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let value = value.split_whitespace().next()?.parse::<f64>().ok()?;
        value.is_finite().then_some((labels, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gauges_and_the_counters() {
        let text = "# HELP kandle_requests_in_flight Requests being executed.\n\
                    # TYPE kandle_requests_in_flight gauge\n\
                    kandle_requests_in_flight 3\n\
                    kandle_requests_in_flight_max 9\n\
                    kandle_requests_queued{model=\"m\"} 2.0\n\
                    kandle_requests_total{route=\"chat\",code=\"200\"} 10\n\
                    kandle_requests_total{route=\"chat\",code=\"503\"} 2\n\
                    kandle_requests_total{route=\"embeddings\",code=\"429\"} 1\n";
        let m = parse(text).unwrap();
        assert_eq!((m.load, m.requests, m.errors), (5.0, 13.0, 2.0));
        assert_eq!(parse("kandle_requests_in_flight 3\n"), None);
        assert_eq!(
            parse("kandle_requests_in_flight NaN\nkandle_requests_queued 1\n"),
            None
        );
        assert_eq!(parse("<html>not metrics</html>"), None);
    }

    #[test]
    fn reads_the_requests_a_gateway_holds() {
        let text = "# TYPE kandle_gateway_held_requests gauge\n\
                    kandle_gateway_held_requests{namespace=\"ml\",name=\"chat\"} 3\n\
                    kandle_gateway_held_requests{name=\"b\",namespace=\"x\"} 0\n\
                    kandle_gateway_held_requests{name=\"nameless-namespace\"} 4\n\
                    kandle_gateway_held_requests_max{namespace=\"ml\",name=\"chat\"} 9\n";
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        assert_eq!(
            parse_held(text),
            vec![(key("ml", "chat"), 3.0), (key("x", "b"), 0.0)]
        );
    }
}
