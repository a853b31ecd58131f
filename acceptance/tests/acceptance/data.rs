//! Data through bindings, as an application sees it: a round trip, tables that outlive
//! the binding that created them, sessions ended at unbind, and plan resources applied.

use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

use crate::harness::Broker;
use crate::osb::{new_id, provision_body, update_body};

/// Connects with a binding's credentials (host, port, database, username, password).
pub async fn try_connect(credentials: &Value) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(credentials["host"].as_str().expect("credentials.host"))
        .port(credentials["port"].as_u64().expect("credentials.port") as u16)
        .dbname(
            credentials["database"]
                .as_str()
                .expect("credentials.database"),
        )
        .user(
            credentials["username"]
                .as_str()
                .expect("credentials.username"),
        )
        .password(
            credentials["password"]
                .as_str()
                .expect("credentials.password"),
        )
        .connect_timeout(std::time::Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

pub async fn connect(credentials: &Value) -> Client {
    try_connect(credentials)
        .await
        .expect("connecting with the binding's credentials")
}

async fn show(client: &Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .expect("SHOW")
        .get(0)
}

#[tokio::test]
async fn data_written_through_a_binding_reads_back() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let client = connect(&credentials).await;
    client
        .batch_execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        .await
        .expect("a binding can create tables");
    for i in 0..100 {
        client
            .execute(
                "INSERT INTO notes (body) VALUES ($1)",
                &[&format!("note {i}")],
            )
            .await
            .expect("insert");
    }
    let count: i64 = client
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 100);
    let body: String = client
        .query_one("SELECT body FROM notes WHERE id = 42", &[])
        .await
        .expect("select")
        .get(0);
    assert_eq!(body, "note 41");
}

#[tokio::test]
async fn the_credentials_uri_connects_to_the_same_database() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let uri = credentials["uri"].as_str().expect("uri");
    let (client, connection) = tokio_postgres::connect(uri, NoTls)
        .await
        .expect("connecting with credentials.uri");
    tokio::spawn(connection);
    let (user, database): (String, String) = {
        let row = client
            .query_one("SELECT session_user::text, current_database()::text", &[])
            .await
            .expect("query");
        (row.get(0), row.get(1))
    };
    assert_eq!(user, credentials["username"].as_str().unwrap_or_default());
    assert_eq!(
        database,
        credentials["database"].as_str().unwrap_or_default()
    );
    let jdbc = credentials["jdbcUrl"].as_str().expect("jdbcUrl");
    let port = credentials["port"].as_u64().expect("port").to_string();
    assert!(
        jdbc.contains(&port) && jdbc.contains(&database),
        "jdbcUrl names the same server and database: {jdbc}"
    );
}

#[tokio::test]
async fn a_table_created_through_one_binding_survives_its_unbind_and_reads_through_a_new_binding() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (first, first_credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    {
        let client = connect(&first_credentials).await;
        client
            .batch_execute(
                "CREATE TABLE orders (id int PRIMARY KEY, item text);
                 INSERT INTO orders VALUES (1, 'phoenix feather'), (2, 'ashes');
                 CREATE SEQUENCE order_numbers;
                 CREATE VIEW order_items AS SELECT item FROM orders;",
            )
            .await
            .expect("creating objects through the first binding");
    }
    osb.delete_binding(&catalog, &instance, &first, &catalog.small)
        .await;

    let (_, second_credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    assert_ne!(
        second_credentials["username"], first_credentials["username"],
        "one role per binding"
    );
    let client = connect(&second_credentials).await;
    let items: Vec<String> = client
        .query("SELECT item FROM orders ORDER BY id", &[])
        .await
        .expect("the table survives the unbind and the new binding reads it")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(items, ["phoenix feather", "ashes"]);
    client
        .execute("INSERT INTO orders VALUES (3, 'egg')", &[])
        .await
        .expect("and writes it");
    client
        .query_one("SELECT nextval('order_numbers')", &[])
        .await
        .expect("the sequence survives too");
    client
        .query("SELECT * FROM order_items", &[])
        .await
        .expect("the view survives too");
    client
        .batch_execute("DROP TABLE orders CASCADE")
        .await
        .expect("and may drop it");
}

#[tokio::test]
async fn unbind_ends_the_open_sessions_of_the_binding() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (binding, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let (_, other_credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    let session = connect(&credentials).await;
    let bystander = connect(&other_credentials).await;
    session
        .query_one("SELECT 1", &[])
        .await
        .expect("the session works before unbind");
    osb.delete_binding(&catalog, &instance, &binding, &catalog.small)
        .await;
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "the open session of an unbound role is ended"
    );
    assert!(
        try_connect(&credentials).await.is_err(),
        "and it cannot log in again"
    );
    bystander
        .query_one("SELECT 1", &[])
        .await
        .expect("another binding's session is untouched");
}

#[tokio::test]
async fn plan_update_applies_max_connections() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = osb.create_instance(&catalog, &catalog.small).await;
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    {
        let client = connect(&credentials).await;
        assert_eq!(show(&client, "max_connections").await, "50", "plan small");
        client
            .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
            .await
            .expect("data");
    }
    let reply = osb
        .update(
            &instance,
            &update_body(&catalog, &catalog.small, &catalog.medium),
            true,
        )
        .await;
    reply.expect(202);
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let client = connect(&credentials).await;
    assert_eq!(show(&client, "max_connections").await, "200", "plan medium");
    assert_eq!(
        show(&client, "shared_buffers").await,
        "128MB",
        "plan medium"
    );
    let kept: i32 = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .expect("data survives a plan change")
        .get(0);
    assert_eq!(kept, 7);
}

#[tokio::test]
async fn provision_parameters_within_the_schema_are_applied() {
    let broker = Broker::start().await;
    let osb = broker.osb();
    let catalog = osb.catalog().await;
    let instance = new_id();
    let mut body = provision_body(&catalog, &catalog.small);
    body["parameters"] = json!({ "max_connections": 77 });
    let reply = osb.provision(&instance, &body, true).await;
    reply.expect(202);
    let done = osb
        .wait_for_instance(&instance, reply.operation().as_deref())
        .await;
    assert_eq!(done.state(), "succeeded", "{}", done.text);
    let (_, credentials) = osb
        .create_binding(&catalog, &instance, &catalog.small)
        .await;
    assert_eq!(
        show(&connect(&credentials).await, "max_connections").await,
        "77"
    );

    let mut update = update_body(&catalog, &catalog.small, &catalog.small);
    update.as_object_mut().expect("object").remove("plan_id");
    update["parameters"] = json!({ "max_connections": 66 });
    let reply = osb.update(&instance, &update, true).await;
    if reply.status.as_u16() == 202 {
        let done = osb
            .wait_for_instance(&instance, reply.operation().as_deref())
            .await;
        assert_eq!(done.state(), "succeeded", "{}", done.text);
    } else {
        reply.expect(200);
    }
    assert_eq!(
        show(&connect(&credentials).await, "max_connections").await,
        "66"
    );
}
