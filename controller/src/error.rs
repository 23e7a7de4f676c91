//! The controller's one error type.

/// Everything that can make a reconcile or the controller's start-up fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the Kubernetes API failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),

    /// Adding or removing the finalizer, or the reconcile inside it, failed.
    #[error("reconcile failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// A reconcile panicked; the controller goes on and retries it later.
    #[error("reconcile panicked: {0}")]
    Panicked(String),

    /// A CustomResourceDefinition the controller needs is not installed.
    #[error(
        "CustomResourceDefinition {0} is not installed or not established: apply crds/ \
         (kubectl apply -f crds/), install the Helm chart, or start the controller with --install-crds"
    )]
    CrdMissing(String),

    /// Waiting for an installed CRD to become established timed out.
    #[error("CustomResourceDefinition {0} was not established within {1} seconds")]
    CrdNotEstablished(String, u64),

    /// Loading the kubeconfig or the in-cluster configuration failed.
    #[error("cannot configure the Kubernetes client (set KUBECONFIG or run in a cluster): {0}")]
    Config(#[source] kube::config::InferConfigError),

    /// The HTTP server for metrics and health could not start.
    #[error("cannot serve metrics on {0}: {1}")]
    Http(String, #[source] std::io::Error),

    /// The cloudhub's CA, serving certificate or bootstrap token could not be set up.
    #[error("cloudhub PKI: {0}")]
    Pki(String),

    /// The namespace for the controller's Secrets does not exist.
    #[error(
        "namespace {0:?} does not exist: create it (kubectl create namespace {0}), install the Helm chart \
         (helm install supermesh charts/supermesh -n {0} --create-namespace), or pass --namespace NAME"
    )]
    NamespaceMissing(String),

    /// The cloudhub listener could not start.
    #[error("cannot listen for agents on {0}: {1}")]
    Listen(String, #[source] std::io::Error),

    /// The controller Lease could not be set up.
    #[error("the controller Lease (which replica reconciles Meshes and Microservices): {0}")]
    Lease(String),

    /// A watch stream ended with an error the controller cannot recover from.
    #[error("{0} controller stopped: {1}")]
    ControllerStopped(&'static str, String),
}

/// Result with the controller's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the API server refused a write because our cached copy was stale
    /// (409 Conflict, or 422 when the finalizer patch's `test` no longer holds).
    /// Retrying soon with a fresh copy resolves it.
    pub fn is_stale_write(&self) -> bool {
        use kube::runtime::finalizer::Error as F;
        let status = |e: &kube::Error| match e {
            kube::Error::Api(s) => Some((s.is_conflict(), s.is_invalid())),
            _ => None,
        };
        match self {
            Error::Kube(e) => status(e).is_some_and(|(conflict, _)| conflict),
            Error::Finalizer(f) => match f.as_ref() {
                F::AddFinalizer(e) | F::RemoveFinalizer(e) => status(e).is_some_and(|(c, invalid)| c || invalid),
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.is_stale_write(),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether the object no longer exists (404): there is nothing left to reconcile.
    pub fn is_gone(&self) -> bool {
        use kube::runtime::finalizer::Error as F;
        let not_found = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.is_not_found());
        match self {
            Error::Kube(e) => not_found(e),
            Error::Finalizer(f) => match f.as_ref() {
                F::AddFinalizer(e) | F::RemoveFinalizer(e) => not_found(e),
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.is_gone(),
                _ => false,
            },
            _ => false,
        }
    }

    /// Short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::CrdMissing(_) | Error::CrdNotEstablished(..) => "crd",
            Error::Config(_) => "config",
            Error::Http(..) | Error::Listen(..) => "http",
            Error::Pki(_) | Error::NamespaceMissing(_) => "pki",
            Error::ControllerStopped(..) => "controller",
            Error::Lease(_) => "lease",
            Error::Panicked(_) => "panic",
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}
