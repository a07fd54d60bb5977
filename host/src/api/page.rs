//! Pages of the top-level lists (`/api/images`, `/api/builds`, `/api/target_images`,
//! `/api/provider_images`) for clients that ask for them.

use super::{ApiError, ApiResult};
use axum::response::Response;

/// `?page=N&per_page=M` (pages from 1; 100 a page unless said, 1,000 at most). A
/// client that names no page gets every row, as Conductor's clients expect; the total
/// is in `X-Total-Count` either way.
#[derive(Debug, Default)]
pub struct Page {
    page: Option<usize>,
    per_page: Option<usize>,
}

const PER_PAGE: usize = 100;
const MAX_PER_PAGE: usize = 1000;

impl Page {
    /// Reads `page` and `per_page` from a query string; other parameters are ignored,
    /// as they always were.
    pub fn parse(query: Option<&str>) -> ApiResult<Page> {
        let mut page = Page::default();
        for pair in query.unwrap_or("").split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "page" => &mut page.page,
                "per_page" => &mut page.per_page,
                _ => continue,
            };
            *slot = Some(value.parse().map_err(|_| {
                ApiError::Incorrect(format!("{key} must be a whole number, not '{value}'"))
            })?);
        }
        Ok(page)
    }

    /// The rows of this page out of `total`.
    pub fn range(&self, total: usize) -> std::ops::Range<usize> {
        if self.page.is_none() && self.per_page.is_none() {
            return 0..total;
        }
        let per_page = self.per_page.unwrap_or(PER_PAGE).clamp(1, MAX_PER_PAGE);
        let page = self.page.unwrap_or(1).max(1);
        let start = (page - 1).saturating_mul(per_page).min(total);
        start..start.saturating_add(per_page).min(total)
    }
}

/// Says how many rows the whole list has, paged or not.
pub fn with_total(mut response: Response, total: usize) -> Response {
    response
        .headers_mut()
        .insert("x-total-count", axum::http::HeaderValue::from(total));
    response
}
