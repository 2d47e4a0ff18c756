"""Deployment files of the project (launcher configs, IAM policies, KubeRay manifests) and their renderer."""
