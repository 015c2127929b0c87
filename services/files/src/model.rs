//! The file record and its conversions.

use chrono::{DateTime, Utc};
use stowage_proto::v1 as pb;
use stowage_runtime::time::{timestamp, timestamp_opt};
use tokio_postgres::Row;
use uuid::Uuid;

/// What a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Kind {
    /// Video.
    Video,
    /// Image.
    Image,
    /// Audio.
    Audio,
    /// Document.
    Document,
    /// Anything else.
    Other,
}

impl Kind {
    /// Name stored in PostgreSQL and used in keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Video => "video",
            Self::Image => "image",
            Self::Audio => "audio",
            Self::Document => "document",
            Self::Other => "other",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "video" => Self::Video,
            "image" => Self::Image,
            "audio" => Self::Audio,
            "document" => Self::Document,
            _ => Self::Other,
        }
    }

    /// From the proto enum; `None` for UNSPECIFIED or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::FileKind::try_from(value).ok()? {
            pb::FileKind::Unspecified => None,
            pb::FileKind::Video => Some(Self::Video),
            pb::FileKind::Image => Some(Self::Image),
            pb::FileKind::Audio => Some(Self::Audio),
            pb::FileKind::Document => Some(Self::Document),
            pb::FileKind::Other => Some(Self::Other),
        }
    }

    fn to_proto(self) -> pb::FileKind {
        match self {
            Self::Video => pb::FileKind::Video,
            Self::Image => pb::FileKind::Image,
            Self::Audio => pb::FileKind::Audio,
            Self::Document => pb::FileKind::Document,
            Self::Other => pb::FileKind::Other,
        }
    }
}

/// Where a file is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FileStatus {
    /// Derivatives and scans running.
    Processing,
    /// Usable.
    Ready,
    /// Processing failed for good.
    Failed,
    /// Held back by the scanner.
    Quarantined,
}

impl FileStatus {
    /// Name stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Quarantined => "quarantined",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "processing" => Self::Processing,
            "failed" => Self::Failed,
            "quarantined" => Self::Quarantined,
            _ => Self::Ready,
        }
    }

    /// From the proto enum; `None` for UNSPECIFIED or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::FileStatus::try_from(value).ok()? {
            pb::FileStatus::Unspecified => None,
            pb::FileStatus::Processing => Some(Self::Processing),
            pb::FileStatus::Ready => Some(Self::Ready),
            pb::FileStatus::Failed => Some(Self::Failed),
            pb::FileStatus::Quarantined => Some(Self::Quarantined),
        }
    }

    pub(crate) fn to_proto(self) -> pb::FileStatus {
        match self {
            Self::Processing => pb::FileStatus::Processing,
            Self::Ready => pb::FileStatus::Ready,
            Self::Failed => pb::FileStatus::Failed,
            Self::Quarantined => pb::FileStatus::Quarantined,
        }
    }
}

/// A derivative of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VariantRecord {
    /// Name.
    pub name: String,
    /// MIME type.
    pub mime_type: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Object key ("" for inline variants).
    pub storage_key: String,
    /// Inline bytes for tiny variants.
    pub inline_data: Option<Vec<u8>>,
    /// When these bytes were recorded (a rebuilt variant gets a new time); `None` for one not
    /// recorded yet.
    pub written_at: Option<DateTime<Utc>>,
}

/// The columns a [`VariantRecord`] is read from (see [`file_columns`]).
macro_rules! variant_columns {
    () => {
        "name, mime_type, size_bytes, width, height, storage_key, inline_data, created_at"
    };
}
pub(crate) use variant_columns;

impl VariantRecord {
    pub(crate) fn from_row(row: &Row) -> Self {
        Self {
            name: row.get("name"),
            mime_type: row.get("mime_type"),
            size_bytes: to_u64(row.get("size_bytes")),
            width: to_u32(row.get("width")),
            height: to_u32(row.get("height")),
            storage_key: row.get("storage_key"),
            inline_data: row.get("inline_data"),
            written_at: row.get("created_at"),
        }
    }

    fn to_proto(&self, privileged: bool) -> pb::Variant {
        pb::Variant {
            name: self.name.clone(),
            mime_type: self.mime_type.clone(),
            size_bytes: self.size_bytes,
            width: self.width,
            height: self.height,
            storage_key: if privileged {
                self.storage_key.clone()
            } else {
                String::new()
            },
            inline_data: self.inline_data.clone().unwrap_or_default(),
        }
    }
}

/// One file's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub owner_id: String,
    /// Name shown to people.
    pub display_name: String,
    /// Kind.
    pub kind: Kind,
    /// Sniffed MIME type.
    pub mime_type: String,
    /// Size.
    pub size_bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Key of the original in the store.
    pub storage_key: String,
    /// Status.
    pub status: FileStatus,
    /// Why failed or quarantined.
    pub status_reason: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Favourite flag.
    pub favorite: bool,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Duration in ms.
    pub duration_ms: u64,
    /// Codec.
    pub codec: String,
    /// Producing application.
    pub package_name: String,
    /// Registered at.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Moved to trash at.
    pub deleted_at: Option<DateTime<Utc>>,
    /// Variants (filled by calls that return them).
    pub variants: Vec<VariantRecord>,
}

/// The columns a [`FileRecord`] is read from. Named rather than `*` in cached statements: one
/// whose result type changes (a migration adding a column while this version still runs) fails
/// on every later call on its connection.
macro_rules! file_columns {
    () => {
        "id, owner_id, display_name, kind, mime_type, size_bytes, sha256, storage_key, status, \
         status_reason, tags, favorite, width, height, duration_ms, codec, package_name, \
         created_at, updated_at, deleted_at"
    };
}
pub(crate) use file_columns;

impl FileRecord {
    pub(crate) fn from_row(row: &Row) -> Self {
        Self {
            id: row.get("id"),
            owner_id: row.get("owner_id"),
            display_name: row.get("display_name"),
            kind: Kind::parse(row.get("kind")),
            mime_type: row.get("mime_type"),
            size_bytes: to_u64(row.get("size_bytes")),
            sha256: row.get("sha256"),
            storage_key: row.get("storage_key"),
            status: FileStatus::parse(row.get("status")),
            status_reason: row.get("status_reason"),
            tags: row.get("tags"),
            favorite: row.get("favorite"),
            width: to_u32(row.get("width")),
            height: to_u32(row.get("height")),
            duration_ms: to_u64(row.get("duration_ms")),
            codec: row.get("codec"),
            package_name: row.get("package_name"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            deleted_at: row.get("deleted_at"),
            variants: Vec::new(),
        }
    }

    /// The proto form; storage keys only for privileged callers.
    pub fn to_proto(&self, privileged: bool) -> pb::File {
        pb::File {
            id: self.id.to_string(),
            owner_id: self.owner_id.clone(),
            display_name: self.display_name.clone(),
            kind: self.kind.to_proto() as i32,
            mime_type: self.mime_type.clone(),
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            status: self.status.to_proto() as i32,
            tags: self.tags.clone(),
            favorite: self.favorite,
            width: self.width,
            height: self.height,
            duration_ms: self.duration_ms,
            package_name: self.package_name.clone(),
            created_at: Some(timestamp(self.created_at)),
            updated_at: Some(timestamp(self.updated_at)),
            deleted_at: timestamp_opt(self.deleted_at),
            variants: self
                .variants
                .iter()
                .map(|v| v.to_proto(privileged))
                .collect(),
            storage_key: if privileged {
                self.storage_key.clone()
            } else {
                String::new()
            },
            status_reason: self.status_reason.clone(),
            codec: self.codec.clone(),
        }
    }
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_u32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}
