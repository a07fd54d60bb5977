//! Images and what hangs off them: builds, target images, provider images, their jobs,
//! quotas and usage, the cascading deletes (reference/conductor-api.md §8), and
//! [`Reader`], several reads in one transaction.

use super::*;

impl Store {
    pub fn image(&self, id: Id) -> Result<Option<Image>> {
        self.reader()?.image(id)
    }

    /// All images, or those of one environment, in creation order.
    pub fn images(&self, environment: Option<u64>) -> Result<Vec<Image>> {
        let txn = self.db.begin_read()?;
        let images = txn.open_table(IMAGES)?;
        match environment {
            None => all(&images),
            Some(env) => {
                let index = txn.open_table(IMAGES_BY_ENVIRONMENT)?;
                let mut rows = Vec::new();
                for entry in index.range((env, 0u128)..=(env, u128::MAX))? {
                    let (key, _) = entry?;
                    if let Some(image) = get(&images, key.value().1)? {
                        rows.push(image);
                    }
                }
                Ok(rows)
            }
        }
    }

    /// Images (all, or one environment's) with their builds, read in one transaction:
    /// listing 10,000 images costs one index scan, not one transaction per image.
    pub fn images_with_builds(&self, environment: Option<u64>) -> Result<Vec<(Image, Vec<Build>)>> {
        let txn = self.db.begin_read()?;
        let images_table = txn.open_table(IMAGES)?;
        let images: Vec<Image> = match environment {
            None => all(&images_table)?,
            Some(env) => {
                let index = txn.open_table(IMAGES_BY_ENVIRONMENT)?;
                let mut rows = Vec::new();
                for entry in index.range((env, 0u128)..=(env, u128::MAX))? {
                    let (key, _) = entry?;
                    rows.extend(get::<u128, Image>(&images_table, key.value().1)?);
                }
                rows
            }
        };
        let builds_table = txn.open_table(BUILDS)?;
        let index = txn.open_table(BUILDS_BY_IMAGE)?;
        // Both sequences are in image-id order (the images table and the environment
        // index are keyed by it, the build index by (image, build)), so one pass over the
        // index pairs them, without a map of 10,000 entries.
        let mut keys = index.iter()?;
        let mut next = keys.next().transpose()?.map(|(key, _)| key.value());
        let mut out = Vec::with_capacity(images.len());
        for image in images {
            let id = image.id.as_u128();
            let mut builds = Vec::new();
            while let Some((owner, build)) = next {
                if owner > id {
                    break;
                }
                if owner == id {
                    builds.extend(get::<u128, Build>(&builds_table, build)?);
                }
                next = keys.next().transpose()?.map(|(key, _)| key.value());
            }
            out.push((image, builds));
        }
        Ok(out)
    }

    pub fn build(&self, id: Id) -> Result<Option<Build>> {
        self.reader()?.build(id)
    }

    /// All builds, or the builds of one image, oldest first.
    pub fn builds(&self, image: Option<Id>) -> Result<Vec<Build>> {
        self.reader()?.builds(image)
    }

    pub fn target_image(&self, id: Id) -> Result<Option<TargetImage>> {
        self.reader()?.target_image(id)
    }

    /// All target images, or those of one build, in creation order.
    pub fn target_images(&self, build: Option<Id>) -> Result<Vec<TargetImage>> {
        self.reader()?.target_images(build)
    }

    pub fn provider_image(&self, id: Id) -> Result<Option<ProviderImage>> {
        self.reader()?.provider_image(id)
    }

    /// All provider images, or those of one target image, in creation order.
    pub fn provider_images(&self, target_image: Option<Id>) -> Result<Vec<ProviderImage>> {
        self.reader()?.provider_images(target_image)
    }

    /// One read transaction for several reads: they see one state of the store, and a
    /// list that looks up each row's parents pays for one transaction, not three a row.
    pub fn reader(&self) -> Result<Reader> {
        Ok(Reader {
            txn: self.db.begin_read()?,
        })
    }

    /// Stores a build request at once: the image (when new), the build, its target images
    /// and one job per target image. Nothing is stored if any part fails.
    /// The environment's quota is checked in the same transaction, so requests made at
    /// the same moment cannot together pass it.
    pub fn create_build(
        &self,
        new_image: Option<&Image>,
        build: &Build,
        target_images: &[TargetImage],
        jobs: &[Job],
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        let environment = match new_image {
            Some(image) => Some(image.environment_id),
            None => Self::image_environment_in(&txn, build.image_id)?,
        };
        if let Some(environment) = environment {
            Self::admit(
                &txn,
                environment,
                u64::from(new_image.is_some()),
                jobs.len() as u64,
            )?;
        }
        Self::create_build_in(&txn, new_image, build, target_images)?;
        Self::put_jobs(&txn, jobs)?;
        self.commit(txn)?;
        Ok(())
    }

    fn create_build_in(
        txn: &WriteTransaction,
        new_image: Option<&Image>,
        build: &Build,
        target_images: &[TargetImage],
    ) -> Result<()> {
        if let Some(image) = new_image {
            put(&mut txn.open_table(IMAGES)?, image.id.as_u128(), image)?;
            txn.open_table(IMAGES_BY_ENVIRONMENT)?
                .insert((image.environment_id, image.id.as_u128()), ())?;
        }
        put(&mut txn.open_table(BUILDS)?, build.id.as_u128(), build)?;
        txn.open_table(BUILDS_BY_IMAGE)?
            .insert((build.image_id.as_u128(), build.id.as_u128()), ())?;
        let mut table = txn.open_table(TARGET_IMAGES)?;
        let mut index = txn.open_table(TARGET_IMAGES_BY_BUILD)?;
        for ti in target_images {
            put(&mut table, ti.id.as_u128(), ti)?;
            index.insert((ti.build_id.as_u128(), ti.id.as_u128()), ())?;
        }
        Ok(())
    }

    /// Stores a push request at once: its provider images and their jobs, within the
    /// quota of `environment`, the images' environment.
    pub fn create_push(
        &self,
        environment: u64,
        provider_images: &[ProviderImage],
        jobs: &[Job],
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        Self::admit(&txn, environment, 0, jobs.len() as u64)?;
        Self::create_push_in(&txn, provider_images)?;
        Self::put_jobs(&txn, jobs)?;
        self.commit(txn)?;
        Ok(())
    }

    fn create_push_in(txn: &WriteTransaction, provider_images: &[ProviderImage]) -> Result<()> {
        let mut table = txn.open_table(PROVIDER_IMAGES)?;
        let mut index = txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?;
        for pi in provider_images {
            put(&mut table, pi.id.as_u128(), pi)?;
            index.insert((pi.target_image_id.as_u128(), pi.id.as_u128()), ())?;
        }
        Ok(())
    }

    /// Stores an imported image in one transaction: image, build, target image and
    /// provider image, all finished.
    pub fn create_import(
        &self,
        image: &Image,
        build: &Build,
        target_image: &TargetImage,
        provider_image: &ProviderImage,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        Self::admit(&txn, image.environment_id, 1, 0)?;
        Self::create_build_in(&txn, Some(image), build, std::slice::from_ref(target_image))?;
        Self::create_push_in(&txn, std::slice::from_ref(provider_image))?;
        self.commit(txn)?;
        Ok(())
    }

    /// The environments whose provider images name `identifier` on this provider: who
    /// pushed or imported that provider-side image.
    pub fn environments_holding(&self, provider: u64, identifier: &str) -> Result<Vec<u64>> {
        let reader = self.reader()?;
        let mut found = Vec::new();
        for pi in reader.provider_images(None)? {
            if pi.provider_id != provider || pi.target_identifier != identifier {
                continue;
            }
            if let Some(env) = reader.target_image_environment(pi.target_image_id)?
                && !found.contains(&env)
            {
                found.push(env);
            }
        }
        Ok(found)
    }

    // ---- quotas ----

    /// An environment's quota; no limits when none was set.
    pub fn quota(&self, environment: u64) -> Result<Quota> {
        let txn = self.db.begin_read()?;
        Ok(get(&txn.open_table(QUOTAS)?, environment)?.unwrap_or_default())
    }

    pub fn put_quota(&self, environment: u64, quota: &Quota) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(QUOTAS)?, environment, quota)?;
        self.commit(txn)?;
        Ok(())
    }

    /// What an environment holds now.
    pub fn usage(&self, environment: u64) -> Result<Usage> {
        let txn = self.db.begin_read()?;
        usage_in(
            &txn.open_table(IMAGES_BY_ENVIRONMENT)?,
            &txn.open_table(BUILDS_BY_IMAGE)?,
            &txn.open_table(TARGET_IMAGES_BY_BUILD)?,
            &txn.open_table(TARGET_IMAGES)?,
            &txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?,
            &txn.open_table(PROVIDER_IMAGES)?,
            environment,
        )
    }

    /// Fails with [`StoreError::Quota`] unless `environment` may take `images` more
    /// images and `jobs` more jobs.
    fn admit(txn: &WriteTransaction, environment: u64, images: u64, jobs: u64) -> Result<()> {
        let quota: Quota = get(&txn.open_table(QUOTAS)?, environment)?.unwrap_or_default();
        if quota == Quota::default() {
            return Ok(());
        }
        let usage = usage_in(
            &txn.open_table(IMAGES_BY_ENVIRONMENT)?,
            &txn.open_table(BUILDS_BY_IMAGE)?,
            &txn.open_table(TARGET_IMAGES_BY_BUILD)?,
            &txn.open_table(TARGET_IMAGES)?,
            &txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?,
            &txn.open_table(PROVIDER_IMAGES)?,
            environment,
        )?;
        quota.admits(environment, &usage, images, jobs)?;
        Ok(())
    }

    fn image_environment_in(txn: &WriteTransaction, image: Id) -> Result<Option<u64>> {
        let image: Option<Image> = get(&txn.open_table(IMAGES)?, image.as_u128())?;
        Ok(image.map(|i| i.environment_id))
    }

    fn put_jobs(txn: &WriteTransaction, jobs: &[Job]) -> Result<()> {
        let mut table = txn.open_table(JOBS)?;
        for job in jobs {
            put(&mut table, job.id.as_u128(), job)?;
        }
        Ok(())
    }

    /// Changes a target image in place and returns the result; `None` when it no longer
    /// exists (deleted while its job ran).
    pub fn update_target_image(
        &self,
        id: Id,
        change: impl FnOnce(&mut TargetImage),
    ) -> Result<Option<TargetImage>> {
        self.update_row(TARGET_IMAGES, id, change)
    }

    /// Changes a provider image in place, like [`Store::update_target_image`].
    pub fn update_provider_image(
        &self,
        id: Id,
        change: impl FnOnce(&mut ProviderImage),
    ) -> Result<Option<ProviderImage>> {
        self.update_row(PROVIDER_IMAGES, id, change)
    }

    /// Reads row `id` of `table`, changes it and writes it back in one transaction.
    fn update_row<T: Row>(
        &self,
        table: TableDefinition<u128, &[u8]>,
        id: Id,
        change: impl FnOnce(&mut T),
    ) -> Result<Option<T>> {
        let txn = self.db.begin_write()?;
        let updated = {
            let mut table = txn.open_table(table)?;
            let current: Option<T> = get(&table, id.as_u128())?;
            match current {
                Some(mut row) => {
                    change(&mut row);
                    put(&mut table, id.as_u128(), &row)?;
                    Some(row)
                }
                None => None,
            }
        };
        self.commit(txn)?;
        Ok(updated)
    }

    // ---- jobs ----

    pub fn jobs(&self) -> Result<Vec<Job>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(JOBS)?)
    }

    pub fn put_job(&self, job: &Job) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(JOBS)?, job.id.as_u128(), job)?;
        self.commit(txn)?;
        Ok(())
    }

    pub fn remove_job(&self, id: Id) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(JOBS)?.remove(id.as_u128())?;
        self.commit(txn)?;
        Ok(())
    }

    // ---- cascading deletes (reference/conductor-api.md §8) ----

    /// Deletes an image, its builds, their target images and provider images, and their
    /// jobs. `None` when there is no such image.
    pub fn delete_image(&self, id: Id) -> Result<Option<Removed>> {
        let txn = self.db.begin_write()?;
        let mut removed = Removed::default();
        let image: Option<Image> = get(&txn.open_table(IMAGES)?, id.as_u128())?;
        let Some(image) = image else { return Ok(None) };
        let builds = children(&txn.open_table(BUILDS_BY_IMAGE)?, id.as_u128())?;
        for build in builds {
            Self::delete_build_in(&txn, build, &mut removed)?;
        }
        txn.open_table(IMAGES)?.remove(id.as_u128())?;
        txn.open_table(IMAGES_BY_ENVIRONMENT)?
            .remove((image.environment_id, id.as_u128()))?;
        self.commit(txn)?;
        Ok(Some(removed))
    }

    /// Deletes a build with its target images and provider images; the image stays.
    pub fn delete_build(&self, id: Id) -> Result<Option<Removed>> {
        self.delete_one(BUILDS, id, Self::delete_build_in)
    }

    /// Deletes a target image with its provider images; build and image stay.
    pub fn delete_target_image(&self, id: Id) -> Result<Option<Removed>> {
        self.delete_one(TARGET_IMAGES, id, Self::delete_target_image_in)
    }

    /// Deletes one provider image record.
    pub fn delete_provider_image(&self, id: Id) -> Result<Option<Removed>> {
        self.delete_one(PROVIDER_IMAGES, id, Self::delete_provider_image_in)
    }

    /// Deletes row `id` of `table` with what hangs off it (`delete_in`), in one
    /// transaction; `None` when there is no such row.
    fn delete_one(
        &self,
        table: TableDefinition<u128, &[u8]>,
        id: Id,
        delete_in: fn(&WriteTransaction, u128, &mut Removed) -> Result<()>,
    ) -> Result<Option<Removed>> {
        let txn = self.db.begin_write()?;
        let mut removed = Removed::default();
        if txn.open_table(table)?.get(id.as_u128())?.is_none() {
            return Ok(None);
        }
        delete_in(&txn, id.as_u128(), &mut removed)?;
        self.commit(txn)?;
        Ok(Some(removed))
    }

    fn delete_build_in(txn: &WriteTransaction, build: u128, removed: &mut Removed) -> Result<()> {
        let row: Option<Build> = get(&txn.open_table(BUILDS)?, build)?;
        let target_images = children(&txn.open_table(TARGET_IMAGES_BY_BUILD)?, build)?;
        for ti in target_images {
            Self::delete_target_image_in(txn, ti, removed)?;
        }
        txn.open_table(BUILDS)?.remove(build)?;
        if let Some(row) = row {
            txn.open_table(BUILDS_BY_IMAGE)?
                .remove((row.image_id.as_u128(), build))?;
        }
        Ok(())
    }

    fn delete_target_image_in(
        txn: &WriteTransaction,
        id: u128,
        removed: &mut Removed,
    ) -> Result<()> {
        let index = txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?;
        let provider_images = children(&index, id)?;
        drop(index);
        for pi in provider_images {
            Self::delete_provider_image_in(txn, pi, removed)?;
        }
        let row: Option<TargetImage> = get(&txn.open_table(TARGET_IMAGES)?, id)?;
        txn.open_table(TARGET_IMAGES)?.remove(id)?;
        txn.open_table(JOBS)?.remove(id)?;
        if let Some(row) = row {
            txn.open_table(TARGET_IMAGES_BY_BUILD)?
                .remove((row.build_id.as_u128(), id))?;
            removed.target_images.push(row);
        }
        Ok(())
    }

    fn delete_provider_image_in(
        txn: &WriteTransaction,
        id: u128,
        removed: &mut Removed,
    ) -> Result<()> {
        let row: Option<ProviderImage> = get(&txn.open_table(PROVIDER_IMAGES)?, id)?;
        txn.open_table(PROVIDER_IMAGES)?.remove(id)?;
        txn.open_table(JOBS)?.remove(id)?;
        if let Some(row) = row {
            txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?
                .remove((row.target_image_id.as_u128(), id))?;
            if !row.target_identifier.is_empty() {
                let job = Job {
                    id: crate::model::new_id(),
                    kind: JobKind::Delete,
                    attempts: 0,
                    deletion: Some(Deletion {
                        provider_id: row.provider_id,
                        account_id: row.account_id,
                        provider_name: row.provider_name.clone(),
                        account_label: row.account_label.clone(),
                        target_identifier: row.target_identifier.clone(),
                    }),
                };
                put(&mut txn.open_table(JOBS)?, job.id.as_u128(), &job)?;
                removed.deletions.push(job);
            }
            removed.provider_images.push(row);
        }
        Ok(())
    }
}

/// Reads made in one read transaction (see [`Store::reader`]).
pub struct Reader {
    txn: ReadTransaction,
}

impl Reader {
    /// The environment an image belongs to.
    pub fn image_environment(&self, id: Id) -> Result<Option<u64>> {
        Ok(self.image(id)?.map(|i| i.environment_id))
    }

    /// The environment of a build's image.
    pub fn build_environment(&self, id: Id) -> Result<Option<u64>> {
        match self.build(id)? {
            Some(build) => self.image_environment(build.image_id),
            None => Ok(None),
        }
    }

    /// The environment of a target image's image.
    pub fn target_image_environment(&self, id: Id) -> Result<Option<u64>> {
        match self.target_image(id)? {
            Some(ti) => self.build_environment(ti.build_id),
            None => Ok(None),
        }
    }

    pub fn image(&self, id: Id) -> Result<Option<Image>> {
        get(&self.txn.open_table(IMAGES)?, id.as_u128())
    }

    pub fn build(&self, id: Id) -> Result<Option<Build>> {
        get(&self.txn.open_table(BUILDS)?, id.as_u128())
    }

    /// All builds, or the builds of one image, oldest first.
    pub fn builds(&self, image: Option<Id>) -> Result<Vec<Build>> {
        self.all_or_children(BUILDS, BUILDS_BY_IMAGE, image)
    }

    pub fn target_image(&self, id: Id) -> Result<Option<TargetImage>> {
        get(&self.txn.open_table(TARGET_IMAGES)?, id.as_u128())
    }

    /// All target images, or those of one build, in creation order.
    pub fn target_images(&self, build: Option<Id>) -> Result<Vec<TargetImage>> {
        self.all_or_children(TARGET_IMAGES, TARGET_IMAGES_BY_BUILD, build)
    }

    pub fn provider_image(&self, id: Id) -> Result<Option<ProviderImage>> {
        get(&self.txn.open_table(PROVIDER_IMAGES)?, id.as_u128())
    }

    /// All provider images, or those of one target image, in creation order.
    pub fn provider_images(&self, target_image: Option<Id>) -> Result<Vec<ProviderImage>> {
        self.all_or_children(
            PROVIDER_IMAGES,
            PROVIDER_IMAGES_BY_TARGET_IMAGE,
            target_image,
        )
    }

    /// Every row of `table`, or, given a parent, the rows `index` lists under it, both in
    /// creation order (ids are time-ordered).
    fn all_or_children<T: Row>(
        &self,
        table: TableDefinition<u128, &'static [u8]>,
        index: TableDefinition<(u128, u128), ()>,
        parent: Option<Id>,
    ) -> Result<Vec<T>> {
        let rows = self.txn.open_table(table)?;
        let Some(parent) = parent else {
            return all(&rows);
        };
        let ids = children(&self.txn.open_table(index)?, parent.as_u128())?;
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(get::<u128, T>(&rows, id)?);
        }
        Ok(found)
    }
}
