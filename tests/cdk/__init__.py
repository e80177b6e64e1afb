"""Tests of the CDK stack (infra-cdk/): template assertions, cdk-nag, a deployment on moto."""
