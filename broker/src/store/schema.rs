//! Diesel's view of the state store's tables; must match both migration sets exactly.

diesel::table! {
    instances (id) {
        id -> Text,
        service_id -> Text,
        plan_id -> Text,
        state -> Text,
        parameters -> Text,
        context -> Text,
        organization_guid -> Nullable<Text>,
        space_guid -> Nullable<Text>,
        maintenance_version -> Nullable<Text>,
        engine -> Text,
        engine_version -> Text,
        settings -> Text,
        port -> Nullable<Integer>,
        host -> Nullable<Text>,
        database_name -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
        backup_key_sealed -> Nullable<Binary>,
    }
}

diesel::table! {
    bindings (id) {
        id -> Text,
        instance_id -> Text,
        service_id -> Text,
        plan_id -> Text,
        state -> Text,
        parameters -> Text,
        bind_resource -> Text,
        context -> Text,
        predecessor_binding_id -> Nullable<Text>,
        username -> Nullable<Text>,
        password_sealed -> Nullable<Binary>,
        host -> Nullable<Text>,
        port -> Nullable<Integer>,
        database_name -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    operations (seq) {
        seq -> BigInt,
        id -> Text,
        kind -> Text,
        instance_id -> Text,
        binding_id -> Nullable<Text>,
        state -> Text,
        description -> Nullable<Text>,
        payload -> Text,
        attempts -> Integer,
        max_attempts -> Integer,
        run_after -> BigInt,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
        finished_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    backups (id) {
        id -> Text,
        instance_id -> Text,
        operation_id -> Nullable<Text>,
        triggered_by -> Text,
        state -> Text,
        strategy -> Nullable<Text>,
        engine -> Nullable<Text>,
        engine_version -> Nullable<Text>,
        format -> Nullable<Text>,
        raw_bytes -> Nullable<BigInt>,
        stored_bytes -> Nullable<BigInt>,
        sha256 -> Nullable<Text>,
        progress_raw_bytes -> Nullable<BigInt>,
        progress_stored_bytes -> Nullable<BigInt>,
        error -> Nullable<Text>,
        created_at -> BigInt,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    restores (id) {
        id -> Text,
        instance_id -> Text,
        backup_id -> Text,
        source_instance_id -> Text,
        operation_id -> Text,
        state -> Text,
        phase -> Nullable<Text>,
        progress_raw_bytes -> Nullable<BigInt>,
        progress_stored_bytes -> Nullable<BigInt>,
        error -> Nullable<Text>,
        created_at -> BigInt,
        finished_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    backup_policies (instance_id) {
        instance_id -> Text,
        schedule -> Nullable<Text>,
        keep_last -> Nullable<Integer>,
        max_age_days -> Nullable<Integer>,
        next_run_at -> Nullable<BigInt>,
        updated_at -> BigInt,
    }
}

diesel::table! {
    backup_tokens (token_sha256) {
        token_sha256 -> Text,
        instance_id -> Text,
        binding_id -> Text,
        created_at -> BigInt,
    }
}

diesel::joinable!(bindings -> instances (instance_id));
diesel::joinable!(operations -> instances (instance_id));
diesel::allow_tables_to_appear_in_same_query!(
    instances,
    bindings,
    operations,
    backups,
    restores,
    backup_policies,
    backup_tokens
);
