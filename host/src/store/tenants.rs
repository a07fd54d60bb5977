//! Environments, users, providers, accounts (credentials sealed), webhooks and the
//! plugins' per-provider state.

use super::*;

impl Store {
    pub fn environments(&self) -> Result<Vec<Environment>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(ENVIRONMENTS)?)
    }

    pub fn environment(&self, id: u64) -> Result<Option<Environment>> {
        let txn = self.db.begin_read()?;
        get(&txn.open_table(ENVIRONMENTS)?, id)
    }

    pub fn environment_by_name(&self, name: &str) -> Result<Option<Environment>> {
        Ok(self.environments()?.into_iter().find(|e| e.name == name))
    }

    /// Creates an environment, giving it the next free id.
    pub fn create_environment(&self, name: &str, description: &str) -> Result<Environment> {
        let txn = self.db.begin_write()?;
        let env = Environment {
            id: Self::next_id(&txn, "environments")?,
            name: name.into(),
            description: description.into(),
        };
        put(&mut txn.open_table(ENVIRONMENTS)?, env.id, &env)?;
        self.commit(txn)?;
        Ok(env)
    }

    pub fn put_environment(&self, env: &Environment) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(ENVIRONMENTS)?, env.id, env)?;
        self.commit(txn)?;
        Ok(())
    }

    /// Deletes an environment that holds no images, and drops it from every account.
    /// `Ok(false)` when it still holds images.
    pub fn delete_environment(&self, id: u64) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let has_images = txn
            .open_table(IMAGES_BY_ENVIRONMENT)?
            .range((id, 0u128)..=(id, u128::MAX))?
            .next()
            .is_some();
        if has_images {
            return Ok(false);
        }
        txn.open_table(ENVIRONMENTS)?.remove(id)?;
        txn.open_table(QUOTAS)?.remove(id)?;
        {
            let mut table = txn.open_table(ACCOUNTS)?;
            let accounts = self.accounts_in(&table)?;
            for mut account in accounts {
                if account.environments.contains(&id) {
                    account.environments.retain(|e| *e != id);
                    self.put_account_in(&mut table, &account)?;
                }
            }
        }
        self.commit(txn)?;
        Ok(true)
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        let txn = self.db.begin_read()?;
        get(&txn.open_table(USERS)?, name)
    }

    pub fn users(&self) -> Result<Vec<User>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(USERS)?)
    }

    /// The environment an image belongs to.
    pub fn image_environment(&self, id: Id) -> Result<Option<u64>> {
        self.reader()?.image_environment(id)
    }

    /// The environment of a build's image.
    pub fn build_environment(&self, id: Id) -> Result<Option<u64>> {
        self.reader()?.build_environment(id)
    }

    /// The environment of a target image's image.
    pub fn target_image_environment(&self, id: Id) -> Result<Option<u64>> {
        self.reader()?.target_image_environment(id)
    }

    pub fn put_user(&self, user: &User) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(USERS)?, user.name.as_str(), user)?;
        self.commit(txn)?;
        Ok(())
    }

    pub fn providers(&self) -> Result<Vec<Provider>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(PROVIDERS)?)
    }

    pub fn provider(&self, id: u64) -> Result<Option<Provider>> {
        let txn = self.db.begin_read()?;
        get(&txn.open_table(PROVIDERS)?, id)
    }

    /// Creates a provider from `provider` with the next free id.
    pub fn create_provider(&self, mut provider: Provider) -> Result<Provider> {
        let txn = self.db.begin_write()?;
        provider.id = Self::next_id(&txn, "providers")?;
        put(&mut txn.open_table(PROVIDERS)?, provider.id, &provider)?;
        self.commit(txn)?;
        Ok(provider)
    }

    pub fn put_provider(&self, provider: &Provider) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(PROVIDERS)?, provider.id, provider)?;
        self.commit(txn)?;
        Ok(())
    }

    /// Deletes a provider, its accounts and its plugin state.
    pub fn delete_provider(&self, id: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PROVIDERS)?.remove(id)?;
        {
            let mut table = txn.open_table(ACCOUNTS)?;
            let rows: Vec<SealedAccount> = all(&table)?;
            for row in rows.iter().filter(|a| a.provider_id == id) {
                table.remove(row.id)?;
            }
        }
        {
            let mut state = txn.open_table(PLUGIN_STATE)?;
            let keys: Vec<String> = state
                .range((id, "")..)?
                .map_while(|entry| match entry {
                    Ok((key, _)) if key.value().0 == id => Some(Ok(key.value().1.to_owned())),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<std::result::Result<_, _>>()?;
            for key in keys {
                state.remove((id, key.as_str()))?;
            }
        }
        self.commit(txn)?;
        Ok(())
    }

    pub fn put_account(&self, account: &Account) -> Result<()> {
        let txn = self.db.begin_write()?;
        self.put_account_in(&mut txn.open_table(ACCOUNTS)?, account)?;
        self.commit(txn)?;
        Ok(())
    }

    pub fn delete_account(&self, id: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(ACCOUNTS)?.remove(id)?;
        self.commit(txn)?;
        Ok(())
    }

    // ---- webhooks ----

    pub fn hooks(&self) -> Result<Vec<Hook>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(HOOKS)?)
    }

    pub fn create_hook(&self, uri: &str) -> Result<Hook> {
        let txn = self.db.begin_write()?;
        let hook = Hook {
            id: Self::next_id(&txn, "hooks")?,
            uri: uri.to_owned(),
        };
        put(&mut txn.open_table(HOOKS)?, hook.id, &hook)?;
        self.commit(txn)?;
        Ok(hook)
    }

    /// `Ok(false)` when there is no such hook.
    pub fn delete_hook(&self, id: u64) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(HOOKS)?.remove(id)?.is_some();
        self.commit(txn)?;
        Ok(existed)
    }

    // ---- plugin state ----

    pub fn plugin_state_get(&self, provider: u64, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PLUGIN_STATE)?;
        Ok(table.get((provider, key))?.map(|v| v.value().to_vec()))
    }

    /// Sets a key, unless the provider already holds `max_keys` other keys.
    /// `Ok(false)` when refused for that reason.
    pub fn plugin_state_set(
        &self,
        provider: u64,
        key: &str,
        value: &[u8],
        max_keys: usize,
    ) -> Result<bool> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PLUGIN_STATE)?;
            if table.get((provider, key))?.is_none() {
                // A read error is an error, not the end of the provider's keys: counting
                // it as the end would let a plugin pass its limit.
                let mut count = 0;
                for entry in table.range((provider, "")..)?.take(max_keys) {
                    if entry?.0.value().0 != provider {
                        break;
                    }
                    count += 1;
                }
                if count >= max_keys {
                    return Ok(false);
                }
            }
            table.insert((provider, key), value)?;
        }
        self.commit(txn)?;
        Ok(true)
    }

    pub fn plugin_state_delete(&self, provider: u64, key: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PLUGIN_STATE)?.remove((provider, key))?;
        self.commit(txn)?;
        Ok(())
    }

    /// Keys of a provider's state that start with `prefix`, at most `limit` of them.
    pub fn plugin_state_keys(
        &self,
        provider: u64,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PLUGIN_STATE)?;
        let mut keys = Vec::new();
        for entry in table.range((provider, prefix)..)? {
            let (key, _) = entry?;
            let (p, k) = key.value();
            if p != provider || !k.starts_with(prefix) || keys.len() >= limit {
                break;
            }
            keys.push(k.to_owned());
        }
        Ok(keys)
    }

    pub fn accounts(&self) -> Result<Vec<Account>> {
        let txn = self.db.begin_read()?;
        self.accounts_in(&txn.open_table(ACCOUNTS)?)
    }

    pub fn account(&self, id: u64) -> Result<Option<Account>> {
        let txn = self.db.begin_read()?;
        match get::<u64, SealedAccount>(&txn.open_table(ACCOUNTS)?, id)? {
            Some(row) => Ok(Some(self.open_row(row)?)),
            None => Ok(None),
        }
    }

    pub fn create_account(&self, mut account: Account) -> Result<Account> {
        let txn = self.db.begin_write()?;
        account.id = Self::next_id(&txn, "accounts")?;
        self.put_account_in(&mut txn.open_table(ACCOUNTS)?, &account)?;
        self.commit(txn)?;
        Ok(account)
    }
}
