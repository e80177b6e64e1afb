"""The Hivemind rooms CDK app (DESIGN §15): one stack per environment of cdk.json."""
