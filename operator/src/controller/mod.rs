//! The level-triggered work, on kube-runtime [`Controller`](kube::runtime::Controller)s
//! gated by the Lease: [`trigger`] fires SerfEventTriggers; [`handler`] keeps each
//! SerfHandler's Ready condition and `observedGeneration` (its Job templates checked by
//! [`dryrun`]), and prunes its finished Jobs;
//! [`keyring`] rotates the Serf cluster's gossip keys to the keyring Secret; [`service`]
//! publishes SerfServices' members as EndpointSlices and ConfigMaps.
//! Each reconcile runs in a span naming its object; failures go to `error_policy`, which
//! backs off per object.

pub mod dryrun;
pub mod handler;
pub mod keyring;
pub mod service;
pub mod trigger;

use futures::Stream;
use tokio::sync::watch;

/// A stream that yields each time the leadership verdict changes (for
/// `Controller::reconcile_all_on`: a new leader looks at every object at once).
pub fn on_leadership_change(rx: watch::Receiver<bool>) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// An Api for `K` in one namespace, or in all.
pub fn api_in<K>(client: &kube::Client, ns: &Option<String>) -> kube::Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    }
}
