//! What a job hands a plugin: the target (provider settings and account credentials),
//! the call context with its progress sink and the provider's stored state, and the
//! calls made outside a job (checking an account, looking an image up).

use super::*;

impl Jobs {
    /// Asks the provider's plugin whether the account's credentials work.
    /// Blocking: it runs the plugin.
    pub fn check_account(&self, provider: &Provider, account: &Account) -> Result<(), PluginError> {
        let plugin = self.plugin_for(provider)?;
        let context = self.call_context(format!("check account {}", account.label), provider);
        plugin.check_account(context, &target_of(provider, account))
    }

    /// Looks an existing image up on the provider, for import. Blocking.
    pub fn lookup(
        &self,
        provider: &Provider,
        account: &Account,
        identifier: &str,
    ) -> Result<ImageDetails, PluginError> {
        let plugin = self.plugin_for(provider)?;
        let context = self.call_context(format!("lookup {identifier}"), provider);
        plugin.lookup(context, &target_of(provider, account), identifier)
    }

    pub(super) fn plugin_for(
        &self,
        provider: &Provider,
    ) -> Result<Arc<plugins::Plugin>, PluginError> {
        self.plugins.get(&provider.target).ok_or_else(|| {
            PluginError::Failed(format!(
                "no plugin for target '{}' is loaded on this server",
                provider.target
            ))
        })
    }

    pub(super) fn call_context(&self, label: String, provider: &Provider) -> CallContext {
        CallContext {
            label,
            progress: Box::new(|_, _| {}),
            state: Some(Box::new(ProviderState {
                store: self.store.clone(),
                provider: provider.id,
            })),
            stop: Stop::new(),
        }
    }

    /// A progress sink that writes the plugin's reports into the record, at most every
    /// [`PROGRESS_EVERY`] unless the report is the first to reach 100 %. Only that one
    /// passes early: a plugin repeating 100 % in a loop is held to the pace like any
    /// other, so no plugin can turn its reports into a stream of writes.
    pub(super) fn progress_context(&self, id: Id, kind: JobKind) -> CallContext {
        self.progress_context_from(id, kind, 0..=100, PROGRESS_EVERY)
    }

    /// A call context whose progress reports fill the percent over `range` (a plugin's
    /// 0 to 100 becomes 80 to 90 when an install came before and a check comes after).
    /// Reports closer together than `every` are dropped (a plugin may report thousands).
    pub(super) fn progress_context_from(
        &self,
        id: Id,
        kind: JobKind,
        range: std::ops::RangeInclusive<u8>,
        every: Duration,
    ) -> CallContext {
        let (floor, ceiling) = (*range.start(), (*range.end()).min(100));
        let store = self.store.clone();
        let changes = self.changes.clone();
        let mut last: Option<(Instant, u8)> = None;
        let progress = Box::new(move |percent: u8, activity: &str| {
            let percent = floor
                + (u16::from(percent.min(100)) * u16::from(ceiling.saturating_sub(floor)) / 100)
                    as u8;
            if let Some((at, written)) = last
                && at.elapsed() < every
                && (percent < ceiling || written == ceiling)
            {
                return;
            }
            last = Some((Instant::now(), percent));
            let activity = activity.to_owned();
            let result = match kind {
                JobKind::Build => store
                    .update_target_image(id, |ti| {
                        if !ti.progress.status.is_terminal() {
                            ti.progress.percent = percent;
                            ti.progress.activity = activity;
                        }
                    })
                    .map(|ti| ti.map(|ti| Change::TargetImage(Box::new(ti)))),
                JobKind::Push | JobKind::Delete => store
                    .update_provider_image(id, |pi| {
                        if !pi.progress.status.is_terminal() {
                            pi.progress.percent = percent;
                            pi.progress.activity = activity;
                        }
                    })
                    .map(|pi| pi.map(|pi| Change::ProviderImage(Box::new(pi)))),
            };
            match result {
                Ok(Some(change)) => {
                    let _ = changes.send(change);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(job = %id, "could not record progress: {e}"),
            }
        });
        CallContext {
            label: id.to_string(),
            progress,
            state: None,
            stop: Stop::new(),
        }
    }
}

pub(super) fn target_of(provider: &Provider, account: &Account) -> Target {
    Target {
        provider_name: provider.name.clone(),
        settings: provider.settings.clone(),
        account_name: account.label.clone(),
        credentials: account.credentials.clone(),
    }
}

/// A provider's plugin state, kept in redb.
pub(super) struct ProviderState {
    pub(super) store: Arc<Store>,
    pub(super) provider: u64,
}

impl StateStore for ProviderState {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.store
            .plugin_state_get(self.provider, key)
            .map_err(state_error)
    }

    fn set(&self, key: &str, value: &[u8], max_keys: usize) -> Result<bool, StateError> {
        self.store
            .plugin_state_set(self.provider, key, value, max_keys)
            .map_err(state_error)
    }

    fn delete(&self, key: &str) -> Result<(), StateError> {
        self.store
            .plugin_state_delete(self.provider, key)
            .map_err(state_error)
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StateError> {
        self.store
            .plugin_state_keys(self.provider, prefix, limit)
            .map_err(state_error)
    }
}

fn state_error(e: StoreError) -> StateError {
    StateError(Box::new(e))
}
