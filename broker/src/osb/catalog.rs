//! `GET /v2/catalog`: the services and plans, without Phoenix's own plan fields.

use actix_web::{HttpResponse, web};

use crate::app_state::AppState;

/// Returns the catalog.
pub async fn get_catalog(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.catalog_json.clone())
}
