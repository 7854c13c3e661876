//! The agent's metadata store: names of images, disks and VMs.
//!
//! Content (chunks, layers, manifests) lives in the chunk store and never
//! changes; what changes is which name points at which manifest, which disks
//! exist and what state VMs are in. That is kept in an embedded redb
//! database (`meta.redb`), one table per kind of record, values in JSON.
//! redb commits are durable and atomic, so a crash never leaves a half-made
//! record.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use spore_files::{FileHandle, Files};

#[derive(Debug, Clone, Copy)]
pub enum Table {
    Images,
    Disks,
    Vms,
    Templates,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Images => TableDefinition::new("images"),
            Table::Disks => TableDefinition::new("disks"),
            Table::Vms => TableDefinition::new("vms"),
            Table::Templates => TableDefinition::new("templates"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database")]
    Db(#[from] redb::Error),
    #[error("metadata record {0} is not valid JSON")]
    Json(String, #[source] serde_json::Error),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Db(e.into())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Debug)]
pub struct Meta {
    db: Database,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        Self::init(Database::create(path)?)
    }

    /// Opens (creating if needed) the database at `path` on `files`: redb
    /// does its I/O through them ([`FileBackend`]), so that the crash tests
    /// can cut the power under it.
    pub fn open_on(files: &dyn Files, path: &Path) -> Result<Self, MetaError> {
        let io = |e: std::io::Error| MetaError::Db(redb::StorageError::from(e).into());
        let new = !files.exists(path);
        let file = files.open(path, new).map_err(io)?;
        if let Some(dir) = path.parent().filter(|_| new) {
            files.sync_dir(dir).map_err(io)?;
        }
        Self::init(Database::builder().create_with_backend(FileBackend(file))?)
    }

    fn init(db: Database) -> Result<Self, MetaError> {
        let txn = db.begin_write()?;
        for t in [Table::Images, Table::Disks, Table::Vms, Table::Templates] {
            txn.open_table(t.def())?;
        }
        txn.commit()?;
        Ok(Meta { db })
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        name: &str,
    ) -> Result<Option<T>, MetaError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table.def())?;
        let Some(v) = t.get(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| MetaError::Json(name.to_owned(), e))
    }

    pub fn put<T: Serialize>(&self, table: Table, name: &str, value: &T) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(value).map_err(|e| MetaError::Json(name.to_owned(), e))?;
        let txn = self.db.begin_write()?;
        txn.open_table(table.def())?
            .insert(name, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Inserts only if `name` is free; false when it is taken.
    pub fn insert_new<T: Serialize>(
        &self,
        table: Table,
        name: &str,
        value: &T,
    ) -> Result<bool, MetaError> {
        let bytes = serde_json::to_vec(value).map_err(|e| MetaError::Json(name.to_owned(), e))?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(table.def())?;
            if t.get(name)?.is_some() {
                return Ok(false);
            }
            t.insert(name, bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Removes a record; false when there was none.
    pub fn remove(&self, table: Table, name: &str) -> Result<bool, MetaError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(table.def())?.remove(name)?.is_some();
        txn.commit()?;
        Ok(existed)
    }

    /// Every record of `table` that parses. A record that does not (a
    /// newer agent's, or damaged) is left where it is, keeps its name
    /// taken, and is reported, so that one bad record never takes the
    /// rest of the host down with it.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, MetaError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table.def())?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let name = k.value().to_owned();
            match serde_json::from_slice(v.value()) {
                Ok(value) => out.push((name, value)),
                Err(e) => tracing::error!(
                    table = ?table,
                    record = %name,
                    error = %e,
                    "metadata record cannot be read; left untouched and skipped"
                ),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crud_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let m = Meta::open(&path).unwrap();
            assert!(m.insert_new(Table::Images, "a", &1u32).unwrap());
            assert!(!m.insert_new(Table::Images, "a", &2u32).unwrap());
            m.put(Table::Disks, "d", &"x").unwrap();
        }
        let m = Meta::open(&path).unwrap();
        assert_eq!(m.get::<u32>(Table::Images, "a").unwrap(), Some(1));
        assert_eq!(
            m.list::<String>(Table::Disks).unwrap(),
            vec![("d".to_string(), "x".to_string())]
        );
        assert!(m.remove(Table::Images, "a").unwrap());
        assert!(!m.remove(Table::Images, "a").unwrap());
        assert_eq!(m.get::<u32>(Table::Images, "a").unwrap(), None);
    }
}

/// redb's storage on a [`FileHandle`].
#[derive(Debug)]
struct FileBackend(std::sync::Arc<dyn FileHandle>);

impl redb::StorageBackend for FileBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        if offset + out.len() as u64 > self.0.len()? {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.0.read_at(out, offset)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_at(data, offset)
    }
}
