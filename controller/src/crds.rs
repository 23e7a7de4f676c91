//! Checking, or installing, the CRDs the controller needs before it starts.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use supermesh_api::names::CONTROLLER_MANAGER;
use tracing::info;

use crate::{Error, Result};

const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes sure every supermesh CRD is installed and established. With `install`,
/// applies them first (server-side apply, so it also upgrades them).
pub async fn ensure(client: &Client, install: bool) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in supermesh_api::crd::all() {
        let name = crd.name_any();
        if install {
            let params = PatchParams::apply(CONTROLLER_MANAGER).force();
            api.patch(&name, &params, &Patch::Apply(&crd)).await?;
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(ESTABLISH_TIMEOUT, established)
                .await
                .map_err(|_| Error::CrdNotEstablished(name.clone(), ESTABLISH_TIMEOUT.as_secs()))?
                .map_err(|e| Error::ControllerStopped("CRD install", e.to_string()))?;
            info!(crd = %name, "CRD installed");
        } else {
            let found = api.get_opt(&name).await?;
            let is_established = conditions::is_crd_established();
            if !found.as_ref().is_some_and(|c| kube::runtime::wait::Condition::matches_object(&is_established, Some(c)))
            {
                return Err(Error::CrdMissing(name));
            }
        }
    }
    Ok(())
}
