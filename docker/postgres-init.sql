-- Extra databases on the compose PostgreSQL: Prefect's and the MLflow auth app's (MLflow's own is POSTGRES_DB).
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;
